"""A volume written by lsbd's first on-store format (before compression and
encryption) keeps opening and reading back exactly.

tests/fixtures/format1/store was made once, with the code of that time, by:

    python tests/fixtures/format1/make_images.py      # a.img, b.img, c.img
    lsbd create vol --size 512K --segment-size 64K
    lsbd import vol a.img;  lsbd snapshot create vol first
    lsbd import vol b.img
    lsbd clone --snapshot first vol kid;  lsbd import kid c.img

and the hashes below are what `lsbd export` gave then.  Never regenerate it:
its point is that it comes from the old code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "format1", "store")
EXPECTED = {
    ("vol", None): "ccdc7b930c9d2b8b7aad339cb801581662a1a39aa92627f19f883a724561068c",
    ("vol", "first"): "c3eb24303c31493cbf1bfa75a9c4975f60c93cc14ec62be6b40aca2f0d44e08b",
    ("kid", None): "43821ebfdfd13826a208649cb0b4ee4380d6cfe5f5dd1f77088f1827862245bf",
}


@pytest.fixture
def store(tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(FIXTURE, copy)
    return copy


def lsbd(store, cache, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lsbd.cli.main", "--store", f"file://{store}",
                           "--cache-dir", str(cache), *args],
                          capture_output=True, text=True, timeout=120)


def export_hash(store, cache, volume: str, snapshot: str | None, out) -> str:
    extra = ("--snapshot", snapshot) if snapshot else ()
    result = lsbd(store, cache, "export", volume, str(out), *extra)
    assert result.returncode == 0, result.stderr
    with open(out, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_format1_volume_reads_back_exactly(store, tmp_path):
    for (volume, snapshot), digest in EXPECTED.items():
        out = tmp_path / f"{volume}-{snapshot}.img"
        assert export_hash(store, tmp_path / "cache", volume, snapshot, out) == digest
    verify = lsbd(store, tmp_path / "cache", "verify", "vol")
    assert verify.returncode == 0, verify.stderr


def test_format1_volume_replays_segments_after_its_checkpoint(store, tmp_path):
    # Without the newest checkpoint, recovery replays the segment after the older one.
    shutil.rmtree(store / "volumes" / "vol" / "ckpt" / "0000000000000002")
    out = tmp_path / "vol.img"
    assert export_hash(store, tmp_path / "cache", "vol", None, out) == EXPECTED[("vol", None)]
