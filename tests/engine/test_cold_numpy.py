"""A cold read of a compressed volume written in large pieces never imports
numpy (lsbd.numpyload): nothing in it is faster with numpy, and its import
(0.12-0.2 s of a core, most of it holding the GIL) ran beside the attach
and the first fetches.  Run in a fresh interpreter: the tests' own has
numpy imported."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from engine_helpers import MiB, open_test_store, read_all

from lsbd.engine.volume import Volume
from lsbd.meta.config import create_volume

SIZE = 8 * MiB      # 8 segments: no checkpoint (16 follow one), the map from its summary
SEGMENT = 1 * MiB

PROBE = r"""
import hashlib, json, os, sys
from lsbd import numpyload
from lsbd.engine.volume import Volume
from lsbd.store.open import open_store

store = open_store(sys.argv[1], endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
vol = Volume.open(store, "vol", cache_root=sys.argv[2])
digest = hashlib.sha256()
for off in range(0, vol.size, 128 * 1024):      # in order: whole fetches, read-ahead
    digest.update(vol.read(off, 128 * 1024))
asked = numpyload._started
imported = "numpy" in sys.modules
vol.close()
print(json.dumps({"sha": digest.hexdigest(), "asked": asked, "imported": imported}))
"""


def test_a_cold_read_of_large_writes_never_imports_numpy(tmp_path, s3_url):
    store = open_test_store(s3_url)
    create_volume(store, "vol", SIZE, segment_size=SEGMENT, compression="zstd:1")
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "w"))
    rng_bytes = os.urandom(SIZE // 2)
    for off in range(0, SIZE, 256 * 1024):     # large pieces, half of them compressible
        piece = rng_bytes[off // 2:off // 2 + 256 * 1024] if off % (512 * 1024) else \
            bytes([off // (256 * 1024) % 251]) * (256 * 1024)
        vol.write(off, piece[:256 * 1024].ljust(256 * 1024, b"\1"))
    want = hashlib.sha256(read_all(vol)).hexdigest()
    vol.close()

    out = subprocess.run([sys.executable, "-c", PROBE, s3_url, str(tmp_path / "cold")],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    got = json.loads(out.splitlines()[-1])
    assert got["sha"] == want, got
    assert not got["asked"], got        # nothing asked lsbd.numpyload for it
    assert not got["imported"], got     # nor imported it otherwise
