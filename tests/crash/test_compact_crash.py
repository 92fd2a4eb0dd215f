"""Killing compaction at any instant loses nothing (DESIGN invariant 6).

A child process (tests/support/compact_child.py) opens a volume and compacts it; its
store wrapper SIGKILLs it at a moment chosen from the seed: before or after
the Nth upload of a rewritten segment, a checkpoint part, the checkpoint
manifest, the Nth delete of an old segment or checkpoint, or after a random
delay.  Then, with no flag (the lease of a dead local process is taken over):
the store alone and the reopened writer read exactly the model, every
snapshot is exact, verify is clean, and a second compaction finishes the job.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from engine_helpers import live_bytes, overwrite, read_all
from lsbd import names
from lsbd.history.compactor import compact
from lsbd.segments import checkpoints as ckpt
from lsbd.meta.config import create_volume, load_config
from lsbd.meta.snapshots import delete_snapshot, list_snapshots
from lsbd.meta.lease import read_holder
from lsbd.segments.remote import store_segment_seqs
from lsbd.engine.volume import Volume
from lsbd.store import open_store

MiB = 1024 * 1024
BS = 4096
HERE = Path(__file__).resolve().parent.parent
PYTHON = str(HERE.parent / ".venv" / "bin" / "python")
LSBD = str(HERE.parent / ".venv" / "bin" / "lsbd")
CHILD = str(HERE / "support" / "compact_child.py")

VSIZE = 12 * MiB
ROUNDS = 4
STAGES = ["segput", "ckptpart", "ckptput", "segdelete", "ckptdelete", "delay"]
KINDS = ["plain", "snap"]
RUNS = 24
# Over S3: segment upload (plain), checkpoint part (snap), manifest (plain),
# segment delete (snap), each reopened with no cache dir; see make_plan.
S3_SEEDS = [1212 + x for x in (0, 3, 4, 7)]


class Lab:
    """Template volumes, built once at a fixed place (the store URL is part of
    the cache dir's identity) and copied back there for each run.

    file: the store and cache dir live in root/work, templates in root/<kind>.
    s3: the store is s3://bucket/work, templates are copies of its objects
    under s3://bucket/tpl-<kind>, and cache dirs are copied as for file."""

    def __init__(self, root: Path, *, working_set: int, segment_size: int,
                 endpoint: str | None = None, bucket: str | None = None):
        self.root = root
        self.working_set = working_set
        self.segment_size = segment_size
        self.endpoint = endpoint
        self.bucket = bucket
        if bucket is None:
            self.url = f"file://{root / 'work'}/store"
        else:
            self.url = f"s3://{bucket}/work"
        self.cache = str(root / "work" / "cache")
        self.models: dict[str, bytes] = {}
        self.snapshots: dict[str, dict[str, tuple[int, bytes]]] = {}
        self.census: dict[tuple[str, float], dict] = {}
        for kind in KINDS:
            self._build(kind)

    def open(self, url: str | None = None):
        return open_store(url or self.url, endpoint_url=self.endpoint)

    def env(self) -> dict:
        env = dict(os.environ)
        if self.endpoint:
            env["AWS_ENDPOINT_URL"] = self.endpoint
        return env

    def _clear_work(self) -> None:
        shutil.rmtree(self.root / "work", ignore_errors=True)
        if self.bucket is not None:
            store = self.open()
            for info in list(store.list()):
                store.delete(info.key)
            store.close()

    def _copy_objects(self, src_url: str, dst_url: str) -> None:
        src, dst = self.open(src_url), self.open(dst_url)
        for info in list(src.list()):
            dst.put(info.key, src.get(info.key))
        src.close()
        dst.close()

    def _build(self, kind: str) -> None:
        self._clear_work()
        store = self.open()
        create_volume(store, "v", VSIZE, segment_size=self.segment_size, retain_seconds=0,
                      checkpoint_segments=16)
        rng = random.Random(kind)
        model = bytearray(VSIZE)
        snaps: dict[str, tuple[int, bytes]] = {}
        with Volume.open(store, "v", cache_root=self.cache) as vol:
            for i in range(ROUNDS):
                overwrite(vol, model, rng, self.working_set)
                if kind == "snap" and i < ROUNDS - 1:
                    snap = vol.snapshot(f"s{i}")
                    snaps[snap.name] = (snap.seq, bytes(model))
        if kind == "snap":
            # A deleted snapshot: the compaction has its checkpoint to delete too.
            delete_snapshot(store, load_config(store, "v"), "s1")
            del snaps["s1"]
        store.close()
        self.models[kind] = bytes(model)
        self.snapshots[kind] = snaps
        shutil.copytree(self.root / "work", self.root / kind)
        if self.bucket is not None:
            self._copy_objects(self.url, f"s3://{self.bucket}/tpl-{kind}")

    def reset(self, kind: str) -> None:
        self._clear_work()
        shutil.copytree(self.root / kind, self.root / "work")
        if self.bucket is not None:
            self._copy_objects(f"s3://{self.bucket}/tpl-{kind}", self.url)

    def run_child(self, plan: dict) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, CHILD, self.url, "v", self.cache, json.dumps(plan)],
                              capture_output=True, text=True, timeout=60, env=self.env(),
                              check=False)

    def counts(self, kind: str, threshold: float) -> dict:
        """What an uninterrupted compaction of the template does (once per kind/threshold)."""
        key = (kind, threshold)
        if key not in self.census:
            self.reset(kind)
            proc = self.run_child({"stage": "none", "threshold": threshold})
            assert proc.returncode == 0, proc.stderr
            self.census[key] = json.loads(proc.stdout.splitlines()[-1])
        return self.census[key]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return Lab(tmp_path_factory.mktemp("compact-crash"), working_set=8 * MiB,
               segment_size=256 * 1024)


@pytest.fixture(scope="module")
def s3lab(tmp_path_factory, moto_server):
    bucket = "lsbd-crash-" + uuid.uuid4().hex[:12]
    with urllib.request.urlopen(urllib.request.Request(f"{moto_server}/{bucket}", method="PUT"),
                                timeout=30) as r:
        r.read()
    return Lab(tmp_path_factory.mktemp("compact-crash-s3"), working_set=4 * MiB,
               segment_size=512 * 1024, endpoint=moto_server, bucket=bucket)


def make_plan(seed: int, lab: Lab) -> tuple[str, dict]:
    rng = random.Random(seed)
    kind = KINDS[seed % 2]
    stage = STAGES[(seed // 2) % len(STAGES)]
    threshold = rng.choice([0.6, 1.0])
    census = lab.counts(kind, threshold)
    plan = {"stage": stage, "threshold": threshold, "when": rng.choice(["before", "after"])}
    if stage == "delay":
        plan["delay"] = rng.uniform(0.0, census["seconds"] * 0.9)
        plan["n"] = 0
    else:
        available = census["counts"].get(stage, 0)
        if available == 0:  # this compaction has no such step: kill at the last of another
            plan["stage"] = "segdelete" if census["counts"].get("segdelete") else "ckptput"
            available = census["counts"][plan["stage"]]
        plan["n"] = rng.randint(1, available)
    return kind, plan


def _crash_and_check(lab: Lab, seed: int) -> None:
    kind, plan = make_plan(seed, lab)
    model = lab.models[kind]
    snaps = lab.snapshots[kind]
    lab.reset(kind)
    proc = lab.run_child(plan)
    killed = proc.returncode == -9
    assert killed or proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    assert "R" in proc.stdout.split(), proc.stderr
    if plan["stage"] != "delay":
        assert killed, f"the planned kill {plan} never came: {proc.stdout}"
    print(f"\n[seed {seed}] {kind} {plan} -> {'killed' if killed else 'completed'}")
    store = lab.open()
    try:
        # Seeds 12..23 repeat 0..11 with the cache dir deleted before the writer reopens.
        _check_after(store, lab, model, snaps, wipe=(seed // 12) % 2 == 1, cli=seed % 5 == 0,
                     lease_left=killed)
    finally:
        store.close()


@pytest.mark.parametrize("seed", range(RUNS))
def test_kill_during_compaction(lab, seed):
    _crash_and_check(lab, seed)


@pytest.mark.parametrize("seed", S3_SEEDS)
def test_kill_during_compaction_s3(s3lab, seed):
    _crash_and_check(s3lab, seed)


def _check_snapshots(store, cache: str, snaps: dict) -> None:
    assert sorted(s.name for s in list_snapshots(store, load_config(store, "v"))) == sorted(snaps)
    for name, (seq, state) in snaps.items():
        with Volume.open(store, "v", cache_root=cache, at_seq=seq) as past:
            assert read_all(past) == state, f"snapshot {name} (seq {seq}) is not exact"


def _check_after(store, lab: Lab, model: bytes, snaps: dict, *, wipe: bool,
                 cli: bool, lease_left: bool) -> None:
    cache = lab.cache
    if lease_left:
        assert read_holder(store, "v") is not None  # the dead child still holds it
    # The store alone (no cache, no journal) holds the whole volume.
    with Volume.open(store, "v", cache_root=cache, read_only=True) as ro:
        assert read_all(ro) == model, "the store alone lost data"
        assert ro.verify() == []
    _check_snapshots(store, cache, snaps)
    if cli:
        proc = subprocess.run([LSBD, "--store", lab.url, "--cache-dir", cache, "verify", "v"],
                              capture_output=True, text=True, timeout=60, env=lab.env(),
                              check=False)
        assert proc.returncode == 0, proc.stderr

    if wipe:
        shutil.rmtree(cache, ignore_errors=True)
    # The writer comes back without --break-lease: the holder is a dead local process.
    with Volume.open(store, "v", cache_root=cache) as vol:
        assert read_all(vol) == model, "the reopened writer lost data"
        compact(vol, threshold=1.0)  # the second compaction finishes the job
        assert read_all(vol) == model
        _check_snapshots(store, cache, snaps)
        if snaps:
            for name in snaps:
                delete_snapshot(store, load_config(store, "v"), name)
            compact(vol, threshold=1.0)
            assert read_all(vol) == model
        stored = store_segment_seqs(store, "v")
        live = live_bytes(model)
        ratio = sum(stored.values()) / live
        print(f"  second compaction: {sum(stored.values()) / MiB:.2f} MiB in {len(stored)} "
              f"segments for {live / MiB:.2f} MiB live ({ratio:.2f}x), "
              f"{len(ckpt.list_checkpoints(store, 'v'))} checkpoints")
        assert ratio <= 1.5
        # Nothing stored is garbage any more.
        infos = {i.seq: i for i in vol.segment_infos()}
        assert all(infos[s].live_blocks > 0 for s in stored), "dead segments left behind"
    with Volume.open(store, "v", cache_root=cache, read_only=True) as ro:
        assert read_all(ro) == model
        assert ro.verify() == []
    assert read_holder(store, "v") is None


def test_census_sees_every_stage(lab):
    """The kill points really fall where they should: an uninterrupted
    compaction of each template uploads segments and a checkpoint and deletes
    segments (and, with a deleted snapshot, its checkpoint)."""
    for kind in KINDS:
        for threshold in (0.6, 1.0):
            c = lab.counts(kind, threshold)
            print(f"\n[census] {kind} threshold {threshold}: {c['counts']} in "
                  f"{c['seconds']:.2f}s; reclaimed {c['report']['bytes_reclaimed'] / MiB:.1f} MiB")
            assert c["counts"].get("segput", 0) >= 1
            assert c["counts"].get("ckptput", 0) >= 1
            assert c["counts"].get("segdelete", 0) >= 1
        assert lab.counts("snap", 1.0)["counts"].get("ckptdelete", 0) >= 1


@pytest.mark.parametrize("stage", ["ckptpart", "ckptdelete"])
def test_no_checkpoint_parts_left_after_a_kill(lab, stage):
    lab.reset("plain")
    proc = lab.run_child({"stage": stage, "n": 1, "when": "after", "threshold": 1.0})
    assert proc.returncode == -9, proc.stderr
    store = lab.open()
    try:
        with Volume.open(store, "v", cache_root=lab.cache) as vol:
            compact(vol, threshold=1.0)
            compact(vol, threshold=1.0)
            assert read_all(vol) == lab.models["plain"]
        manifests = set(ckpt.list_checkpoints(store, "v"))
        leftovers = [i.key for i in store.list(names.checkpoint_prefix("v"))
                     if names.parse_seq(i.key.split("/")[-2]) not in manifests]
        assert leftovers == [], f"checkpoint objects without a manifest: {leftovers}"
    finally:
        store.close()
