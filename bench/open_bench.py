#!/usr/bin/env python3
"""Opening a large map from its checkpoint chain, measured apart.

    .venv/bin/python bench/open_bench.py [--base 16M] [--deltas 8] [--delta 512K]
        [--multi 1024] [--rounds 2] [--profile] [--workdir /var/tmp] [--keep DIR]

Writes a synthetic chain into a file:// store: a base of --base extents of
one block each at random over a 1 TiB volume (what random 4 KiB writes
leave), --multi extents of 256 blocks among them (a region written in
1 MiB pieces), and --deltas deltas of --delta entries each at random (a few
of them holes), as lsbd.segments.checkpoints writes them.  Then times
lsbd.engine.recovery.load_checkpoint into an empty map, --rounds times,
and checks the map it built against the chain laid over by the reference
overlay (lsbd.engine.deltas.overlay) on a sample.  --profile prints where
the time went (cProfile).  --keep DIR reuses (or leaves) the store there.
Not a test: seconds vary with the machine's load."""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import parse_size, work_dir

from lsbd.engine.deltas import lay_over
from lsbd.engine.recovery import load_checkpoint
from lsbd.map.blockmap import BlockMap, SegmentInfo
from lsbd.segments import checkpoints as ckpt
from lsbd.store.local import LocalStore
from lsbd.store.open import open_store

BS = 4096
VOLUME = 1 << 40
BLOCKS = VOLUME // BS
SEGMENT_BLOCKS = 8192


def _base_entries(rng: random.Random, n: int, multi: int, segs: int):
    """n extents over the volume in block order, generated a slice of the
    volume at a time: `multi` of 256 blocks at the start (a region written
    in 1 MiB pieces), the rest single blocks at random."""
    low = multi * 256
    for i in range(multi):
        yield (i * 256, 256, 1 + i % segs, 4096 + (i % 32) * 256 * BS)
    slices = 64
    per = (n - multi) // slices
    width = (BLOCKS - low) // slices
    k = 0
    for s in range(slices):
        count = per if s < slices - 1 else n - multi - per * (slices - 1)
        for lba in sorted(rng.sample(range(low + s * width, low + (s + 1) * width), count)):
            yield (lba, 1, 1 + (k * 7919) % segs, 4096 + (k % SEGMENT_BLOCKS) * BS)
            k += 1


def _segments(first: int, last: int) -> list[SegmentInfo]:
    return [SegmentInfo(seq=s, state=2, sealed_ns=0, size=32 << 20, live_blocks=0,
                        data_blocks=SEGMENT_BLOCKS, trailer_crc=0)
            for s in range(first, last + 1)]


def build(store: LocalStore, args) -> ckpt.Manifest:
    rng = random.Random(7)
    n = parse_size(args.base)
    t = time.monotonic()
    seq = n // SEGMENT_BLOCKS + 1
    segments = _segments(1, seq)
    m = ckpt.write_checkpoint(store, "v", "vid", seq, volume_size=VOLUME, block_size=BS,
                              extents=_base_entries(rng, n, args.multi, seq), segments=segments)
    print(f"base {m.extents} extents, {time.monotonic() - t:.1f} s", flush=True)
    d = parse_size(args.delta)
    for k in range(args.deltas):
        t = time.monotonic()
        dl = set(rng.sample(range(BLOCKS), d))
        # Some land inside the 1 MiB pieces, cutting them.
        for _ in range(min(args.multi, d // 64)):
            dl.add(rng.randrange(args.multi * 256))
        dlbas = sorted(dl)
        holes = frozenset(rng.sample(dlbas, len(dlbas) // 100))
        first = seq + 1
        seq += d // SEGMENT_BLOCKS + 1
        span = seq - first + 1
        entries = [(lba, 1, 0, 0) if lba in holes else
                   (lba, 1, first + i % span, 4096 + (i % SEGMENT_BLOCKS) * BS)
                   for i, lba in enumerate(dlbas)]
        segments += _segments(first, seq)
        m = ckpt.write_checkpoint(store, "v", "vid", seq, volume_size=VOLUME, block_size=BS,
                                  extents=entries, segments=segments, delta_of=m)
        print(f"delta {k + 1}: {m.extents} entries, {time.monotonic() - t:.1f} s", flush=True)
    return m


def check(bm: BlockMap, store: LocalStore, manifest: ckpt.Manifest) -> None:
    """The map against the reference overlay (lsbd.engine.deltas.lay_over),
    extent by extent."""
    chain = ckpt.read_chain(store, "v", manifest)
    want = (e for e in lay_over([ckpt.read_extents(store, m) for m in chain], BS) if e[2])
    got = bm.iter_extents()
    count = 0
    for w in want:
        g = next(got, None)
        if g is None or tuple(g) != tuple(w):
            raise SystemExit(f"map differs at extent {count}: {g} != {w}")
        count += 1
    assert count == bm.extent_count(), (count, bm.extent_count())
    print(f"checked: {count} extents", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="16M")
    ap.add_argument("--deltas", type=int, default=8)
    ap.add_argument("--delta", default="512K")
    ap.add_argument("--multi", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--check", action="store_true", help="check the map (slow)")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--keep", metavar="DIR")
    ap.add_argument("--store", metavar="DIR",
                    help="time a checkpoint of a file:// store instead (with --volume, --seq)")
    ap.add_argument("--volume", default="v")
    ap.add_argument("--seq", type=int)
    args = ap.parse_args()
    work = args.keep or work_dir("lsbd-open-bench-", args.workdir)
    try:
        store_dir = args.store or os.path.join(work, "store")
        os.makedirs(store_dir, exist_ok=True)
        # A volume's own store (compressed or sealed objects) through open_store.
        store = open_store(f"file://{store_dir}") if args.store else LocalStore(store_dir)
        seqs = ckpt.list_checkpoints(store, args.volume)
        manifest = ckpt.read_manifest(store, args.volume, args.seq or seqs[-1]) if seqs else \
            build(store, args)
        for r in range(args.rounds):
            path = os.path.join(work, "map")
            BlockMap.destroy(path)
            bm = BlockMap(path, BS)
            prof = cProfile.Profile() if args.profile else None
            load = os.getloadavg()[0]
            t = time.monotonic()
            cpu = time.process_time()
            if prof:
                prof.enable()
            load_checkpoint(bm, store, args.volume, manifest)
            if prof:
                prof.disable()
            took = time.monotonic() - t
            cpu = time.process_time() - cpu
            print(f"open: {took:.1f} s ({cpu:.1f} s of CPU), {bm.extent_count()} extents, "
                  f"load average {load:.1f}", flush=True)
            if prof:
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
            if args.check and r == 0 and not args.store:
                check(bm, store, manifest)
            bm.close()
            BlockMap.destroy(path)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
