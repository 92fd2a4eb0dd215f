#!/usr/bin/env python3
"""What encryption and compression cost, on bytes alone (no engine), one run.

    .venv/bin/python bench/crypto_bench.py [--tree DIR ...] [--mib 128]

1. AEAD: AES-256-GCM against ChaCha20-Poly1305 (both from `cryptography`),
   sealing and opening 4 KiB, 64 KiB and 1 MiB: the choice of cipher.
2. Frame size: the bytes of real trees (default /usr/share and this
   virtualenv, as one tar stream, plus the same amount of random data)
   framed at 4-256 KiB with zstd level 3 and the "raw unless it saves 1/8"
   rule: the compression ratio, and what one random 4 KiB read costs
   (opening and decompressing the frame that holds it).

Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from lsbd.crypto.compress import Compressor
from lsbd.crypto.frames import Framer, Place, object_cipher

MiB = 1 << 20


def aead_table() -> None:
    key = os.urandom(32)
    print("AEAD (one core)                    seal        open")
    for name, cls in (("AES-256-GCM", AESGCM), ("ChaCha20-Poly1305", ChaCha20Poly1305)):
        aead = cls(key)
        for size in (4096, 65536, MiB):
            data, nonce, aad = os.urandom(size), os.urandom(12), os.urandom(72)
            n = max(100, (64 * MiB) // size)
            t = time.perf_counter()
            for _ in range(n):
                sealed = aead.encrypt(nonce, data, aad)
            seal = (time.perf_counter() - t) / n
            t = time.perf_counter()
            for _ in range(n):
                aead.decrypt(nonce, sealed, aad)
            opened = (time.perf_counter() - t) / n
            print(f"  {name:18s} {size // 1024:5d} KiB  {size / seal / MiB:6.0f} MiB/s "
                  f"{seal * 1e6:7.1f} us  {size / opened / MiB:6.0f} MiB/s {opened * 1e6:7.1f} us")


def sample(trees: list[str], mib: int) -> bytes:
    """`mib` MiB of tar stream of the trees, then as much random data."""
    out = subprocess.run(["tar", "cf", "-", *trees], capture_output=True).stdout[:mib * MiB]
    return out + os.urandom(len(out))


def frame_table(data: bytes) -> None:
    volume_id, object_id = os.urandom(16), os.urandom(16)
    name = "volumes/bench/seg/0000000000000001"
    cipher = object_cipher(os.urandom(32), volume_id=volume_id, name=name, object_id=object_id)
    print(f"\nframes of {len(data) // MiB} MiB (half real files, half random), zstd 3, "
          "encrypted")
    print("  frame   ratio  compressed frames  seal MiB/s  random 4 KiB read (open one frame)")
    for size in (4096, 16384, 32768, 65536, 131072, 262144):
        framer = Framer(cipher, Compressor(3))
        frames = []
        t = time.perf_counter()
        for pos in range(0, len(data), size):
            place = Place(volume_id=volume_id, name=name, object_id=object_id, position=pos)
            frames.append((framer.seal(data[pos:pos + size], place), place))
        seal = time.perf_counter() - t
        stored = sum(len(f) for f, _ in frames)
        packed = sum(1 for f, _ in frames if f[0] == 1)
        probe = frames[::max(1, len(frames) // 2000)]
        t = time.perf_counter()
        for frame, place in probe:
            framer.open(frame, place)
        per_read = (time.perf_counter() - t) / len(probe)
        print(f"  {size // 1024:3d} KiB  {len(data) / stored:5.2f}  {packed / len(frames):8.0%}"
              f"      {len(data) / seal / MiB:8.0f}     {per_read * 1e6:7.1f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append",
                        help="a directory to sample (default /usr/share and sys.prefix)")
    parser.add_argument("--mib", type=int, default=64, help="MiB of file data to sample")
    args = parser.parse_args()
    aead_table()
    frame_table(sample(args.tree or ["/usr/share", sys.prefix], args.mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
