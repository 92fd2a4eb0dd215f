#!/usr/bin/env python3
"""What the block map's look-up of a 1 MiB read costs after random writes,
alone and beside threads that want the GIL.

    .venv/bin/python bench/map_lookup_bench.py [--code DIR] [--busy 0,1]
        [--blocks 1M] [--rounds 3] [--workdir /var/tmp]

A map of --blocks blocks, about one extent a block (85% one block, the
rest two to four, a hole now and then: a region after random 4 KiB
writes), warm in the page cache, is looked up 256 blocks at a time from
end to end (BlockMap.lookup, as a 1 MiB read plans), under the serving
process's GIL switch interval.  --busy: that many threads beside it, each
a system call then some Python (bench/map_bench.py's busy_loop, a request
thread's rhythm): py-lmdb lets go of the GIL at every step of the cursor,
and each time one of them may take it.  Reported per look-up: wall and
the look-up thread's processor time.  --code DIR: the lsbd to measure
(default: this checkout), to compare two in turn.  Not a test: figures
are noisy, compare within a run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOOKUP = 256            # blocks: a 1 MiB read of 4 KiB blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default=os.path.dirname(HERE), help="the lsbd checkout to measure")
    ap.add_argument("--busy", default="0,1", help="GIL-wanting threads beside, comma separated")
    ap.add_argument("--blocks", default="1M", help="blocks in the map (K/M suffixes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.code))
    from lsbd.cli import context
    from lsbd.map.blockmap import BlockMap, Extent
    print(f"lsbd from {os.path.dirname(os.path.dirname(context.__file__))}")
    sys.path.append(HERE)       # after lsbd is imported: map_bench puts this checkout first
    from map_bench import busy_loop, info

    sys.setswitchinterval(context.SERVING_SWITCH_INTERVAL)
    blocks = int(args.blocks.rstrip("KM")) << {"K": 10, "M": 20}.get(args.blocks[-1], 0)
    rng = random.Random(1)
    extents, lba = [], 0
    while lba < blocks:
        n = 1 if rng.random() < 0.85 else rng.randint(2, 4)
        extents.append(Extent(lba, n, rng.randint(1, 3000), rng.randint(0, 8191) * 4096))
        lba += n + (1 if rng.random() < 0.05 else 0)
    folder = tempfile.mkdtemp(prefix="lsbd-map-lookup-", dir=args.workdir)
    bm = BlockMap(os.path.join(folder, "map"), 4096, scratch=True)
    try:
        bm.load(extents, [info(s, 1) for s in range(1, 3001)])
        print(f"{len(extents)} extents over {blocks} blocks")
        print(f"{'busy':>4} {'µs a look-up':>12} {'cpu µs':>7} {'extents':>8}")
        for busy in (int(b) for b in args.busy.split(",")):
            stop = threading.Event()
            others = [threading.Thread(target=busy_loop, args=(stop,), daemon=True)
                      for _ in range(busy)]
            for t in others:
                t.start()
            try:
                for _ in range(args.rounds):
                    wall, cpu = time.perf_counter(), time.thread_time()
                    found = sum(len(bm.lookup(first, LOOKUP))
                                for first in range(0, blocks, LOOKUP))
                    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                    count = blocks // LOOKUP
                    print(f"{busy:>4} {wall / count * 1e6:>12.1f} {cpu / count * 1e6:>7.1f} "
                          f"{found // count:>8}", flush=True)
            finally:
                stop.set()
                for t in others:
                    t.join()
    finally:
        bm.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
