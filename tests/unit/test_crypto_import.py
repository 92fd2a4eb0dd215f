"""`cryptography` (a 14 MB library) is loaded only for an encrypted volume:
a plain or compressed volume's every open (a mount's attach) would pay for
it otherwise.  Run in a fresh interpreter, since the test process has
imported everything."""

import json
import subprocess
import sys

PROBE = r"""
import json, sys
from lsbd.engine.volume import Volume
from lsbd.meta.config import create_volume
from lsbd.store.open import open_store

store = open_store(sys.argv[1])
create_volume(store, "vol", 1 << 20, compression="zstd")
vol = Volume.open(store, "vol", cache_root=sys.argv[2])
vol.write(0, b"x" * 4096)
vol.flush_to_store()
vol.close()
vol = Volume.open(store, "vol", cache_root=sys.argv[2] + "-new")   # rebuilt from the store
ok = vol.read(0, 4096) == b"x" * 4096
vol.close()
loaded = "cryptography" in sys.modules
from lsbd.crypto.aead import Cipher
Cipher(bytes(32)).seal(bytes(12), b"x", b"")
print(json.dumps({"ok": ok, "loaded": loaded, "loaded_after": "cryptography" in sys.modules}))
"""


def test_a_compressed_volume_never_loads_cryptography(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, f"file://{tmp_path / 'store'}",
                          str(tmp_path / "cache")], check=True, capture_output=True,
                         text=True).stdout
    got = json.loads(out.splitlines()[-1])
    assert got == {"ok": True, "loaded": False, "loaded_after": True}
