#!/usr/bin/env python3
"""What a sealed segment of random 4 KiB writes costs the block map, by map
size and by how many segments go into one commit.

    .venv/bin/python bench/map_bench.py [--extents 0.3M,3M] [--batch 1,8]
        [--busy 0,4] [--segments 32] [--workdir /var/tmp]

For each map size: a map of that many one-block extents spread over a
1 TiB volume is loaded, then --segments segments of 8,192 random one-block
writes are applied (BlockMap.apply_segments), --batch of them per
transaction, synced as the writer's map is.  Reported per segment: wall
and CPU time inside the transaction (lookups and puts) and in the commit
(LMDB writing and syncing the pages it dirtied), and the process's
anonymous memory before and at its peak, under the serving process's
malloc settings and GIL switch interval (lsbd.cli.context): a commit's dirty pages live in the
heap until it ends.  --busy: that many threads beside it, each a loop of
a little Python and a system call, as the NBD server's request threads
are: py-lmdb lets go of the GIL in every cursor call, and each time one of
them may take it first (the wall time grows, the CPU does not).  Not a
test: figures are noisy, compare within a run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lsbd import linux
from lsbd.cli import context
from lsbd.format.segment import DATA, Record
from lsbd.map import testing as map_testing
from lsbd.map.blockmap import BlockMap
from lsbd.map.encoding import SegmentInfo

VOLUME_BLOCKS = 1 << 28          # 1 TiB of 4 KiB blocks
WRITES = 8192                    # one 32 MiB segment of 4 KiB writes


def anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return 0.0


def info(seq: int, blocks: int) -> SegmentInfo:
    return SegmentInfo(seq=seq, state=1, sealed_ns=0, size=1, live_blocks=0,
                       data_blocks=blocks, trailer_crc=0)


def busy_loop(stop: threading.Event) -> None:
    """A request thread's rhythm: a system call (GIL let go), then about
    ten microseconds of Python."""
    a, b = socket.socketpair()
    buf = bytes(4096)
    with a, b:
        while not stop.is_set():
            a.sendall(buf)
            b.recv(4096)
            x = 0
            for i in range(150):
                x += i


def run(folder: str, extents: int, batch: int, segments: int, busy: int = 0,
        process: bool = False) -> dict:
    path = os.path.join(folder, f"map-{extents}-{batch}")
    bm = BlockMap(path, 4096)
    try:
        step = VOLUME_BLOCKS // extents
        bm.load(((lba, 1, 1, 4096) for lba in range(0, VOLUME_BLOCKS, step)),
                [info(1, extents)], applied_seq=b"1")
        stats = bm.map_stats()
        rng = random.Random(extents)
        inside = [0.0, 0.0]
        commit = [0.0, 0.0]
        if process:
            # The map's own process applies; here: the wall time and this
            # thread's CPU of each call, and the child's CPU as it reports it.
            bm.offload_writes()
        else:
            # timing only; the map's own commits are the same
            map_testing.time_write_transactions(bm, inside, commit)
        stop = threading.Event()
        others = [threading.Thread(target=busy_loop, args=(stop,), daemon=True)
                  for _ in range(busy)]
        for t in others:
            t.start()
        before = peak = anon_mib()
        seq = 2
        for _ in range(max(1, segments // batch)):
            group = [(info(seq + i, WRITES),
                      [Record(DATA, 0, rng.randrange(VOLUME_BLOCKS), 1, 4096 * (j + 1), b"")
                       for j in range(WRITES)]) for i in range(batch)]
            seq += batch
            t0, c0 = time.perf_counter(), time.thread_time()
            bm.apply_segments(group, applied_seq=str(seq - 1).encode())
            if process:
                inside[0] += time.perf_counter() - t0
                inside[1] += time.thread_time() - c0
            del group
            peak = max(peak, anon_mib())
        stop.set()
        for t in others:
            t.join()
        n = seq - 2
        if process:
            commit[1] = bm.offload_cpu_seconds     # the child's, transaction and commit
        return {"extents": extents, "batch": batch, "busy": busy,
                "leaf_pages": stats["leaf_pages"],
                "inside_ms": 1000 * inside[0] / n, "inside_cpu_ms": 1000 * inside[1] / n,
                "commit_ms": 1000 * commit[0] / n, "commit_cpu_ms": 1000 * commit[1] / n,
                "anon_before_mib": before, "anon_peak_mib": peak}
    finally:
        bm.close()
        BlockMap.destroy(path)


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extents", default="0.3M,3M", help="map sizes, comma-separated")
    ap.add_argument("--batch", default="1,8", help="segments per commit, comma-separated")
    ap.add_argument("--busy", default="0", help="request-like threads beside the map's, "
                    "comma-separated")
    ap.add_argument("--segments", type=int, default=32, help="segments applied per case")
    ap.add_argument("--workdir", default="/var/tmp", help="where the maps go")
    ap.add_argument("--process", action="store_true",
                    help="apply in the map's own process (BlockMap.offload_writes): txn ms is "
                    "each call's wall time, its cpu this thread's, the commit's cpu the child's")
    ap.add_argument("--writemap", action="store_true",
                    help="open the map with LMDB's writemap (dirty pages in the file's mapping)")
    args = ap.parse_args()
    if args.writemap:
        import lmdb
        plain_open = lmdb.open
        lmdb.open = lambda *a, **k: plain_open(*a, writemap=True, **k)
    linux.mallopt(linux.M_TRIM_THRESHOLD, context.SERVING_TRIM_THRESHOLD)
    linux.mallopt(linux.M_MMAP_THRESHOLD, context.SERVING_MMAP_THRESHOLD)
    linux.mallopt(linux.M_ARENA_MAX, context.SERVING_ARENA_MAX)
    sys.setswitchinterval(context.SERVING_SWITCH_INTERVAL)
    os.makedirs(args.workdir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="lsbd-map-bench-", dir=args.workdir)
    print(f"load average {os.getloadavg()[0]:.1f} (2 cores, shared)")
    print(f"{'extents':>9} {'leaves':>7} {'batch':>5} {'busy':>4} {'txn ms':>7} {'cpu':>5} "
          f"{'commit ms':>9} {'cpu':>5} {'anon MiB':>13}")
    try:
        for extents in (parse_count(x) for x in args.extents.split(",")):
            for batch, busy in ((int(b), int(n)) for b in args.batch.split(",")
                                for n in args.busy.split(",")):
                # Each case in its own process: the heap keeps what a case took.
                if os.fork() == 0:
                    r = run(folder, extents, batch, args.segments, busy, args.process)
                    print(f"{r['extents']:>9} {r['leaf_pages']:>7} {r['batch']:>5} {busy:>4} "
                          f"{r['inside_ms']:>7.0f} {r['inside_cpu_ms']:>5.0f} "
                          f"{r['commit_ms']:>9.0f} {r['commit_cpu_ms']:>5.0f} "
                          f"{r['anon_before_mib']:>5.0f} -> {r['anon_peak_mib']:>3.0f}",
                          flush=True)
                    os._exit(0)
                os.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
