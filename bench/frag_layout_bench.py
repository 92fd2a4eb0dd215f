#!/usr/bin/env python3
"""Sequential 1 MiB reads of a range written by random 4 KiB writes: what
the disk gives for each layout of the blocks, and what the engine gets.

    .venv/bin/python bench/frag_layout_bench.py [--region 1G] [--passes 2]
        [--disk] [--engine] [--workdir /var/tmp] [--keep DIR]

--disk (no lsbd code): --region of 4 KiB blocks placed at random over
32 MiB files, as random writes leave them in segments, read 1 MiB of the
range at a time by 8 threads with the page cache dropped first:
  scattered  each file's blocks in write order (lsbd's segments today): the
             pieces of each MiB handed to the kernel (WILLNEED), then read
             (SegmentFiles.read_batch's pattern);
  whole      the same, and each file handed to the kernel whole when a
             read first touches it (a whole-file read-ahead);
  sorted     each file's blocks in block order (a segment sorted when
             sealed): a MiB is one short read in order per file.

--engine: a volume in a file:// store, --region filled with 1 MiB writes
then as many bytes of random 4 KiB writes inside it (segments of 32 MiB),
closed, opened again (a session that only reads: no read-directed
defragmentation), then read in order, 1 MiB at a time in one thread:
once with the page cache dropped (cold), once right after (warm).  When
cold and warm agree, the reads wait for the processor, not the disk.

Needs root (to drop the page cache).  Not a test: figures move with the
machine's load; compare the lines of one run."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchlib import drop_page_cache, parse_size, work_dir

MiB = 1 << 20
BS = 4096
FILE = 32 * MiB


def disk_files(folder: str, region: int) -> int:
    nfiles = region // FILE
    buf = os.urandom(FILE)
    for f in range(nfiles):
        path = os.path.join(folder, f"f{f}")
        if not os.path.exists(path) or os.path.getsize(path) != FILE:
            with open(path, "wb") as fh:
                fh.write(buf)
    return nfiles


def disk_layout(nfiles: int, kind: str) -> list[tuple[int, int]]:
    """lba -> (file, offset): a random placement, each file's blocks in
    write order or sorted."""
    per = FILE // BS
    order = list(range(nfiles * per))
    random.Random(1).shuffle(order)
    where: list[tuple[int, int]] = [(0, 0)] * len(order)
    for f in range(nfiles):
        lbas = order[f * per:(f + 1) * per]
        if kind == "sorted":
            lbas.sort()
        for slot, lba in enumerate(lbas):
            where[lba] = (f, slot * BS)
    return where


def spans(pieces) -> list[list[int]]:
    out: list[list[int]] = []
    for f, off in sorted(pieces):
        if out and out[-1][0] == f and off - out[-1][2] <= 16 * 1024:
            out[-1][2] = off + BS
        else:
            out.append([f, off, off + BS])
    return out


def disk_pass(folder: str, nfiles: int, kind: str) -> float:
    where = disk_layout(nfiles, "sorted" if kind == "sorted" else "scattered")
    fds = [os.open(os.path.join(folder, f"f{f}"), os.O_RDONLY) for f in range(nfiles)]
    touched: set[int] = set()
    lock = threading.Lock()
    per_mib = MiB // BS

    def one(m: int) -> int:
        todo = spans(where[m * per_mib:(m + 1) * per_mib])
        if kind == "whole":
            with lock:
                new = {f for f, _a, _b in todo} - touched
                touched.update(new)
            for f in new:
                os.posix_fadvise(fds[f], 0, FILE, os.POSIX_FADV_WILLNEED)
        for f, a, b in todo:
            os.posix_fadvise(fds[f], a, b - a, os.POSIX_FADV_WILLNEED)
        return sum(len(os.pread(fds[f], b - a, a)) for f, a, b in todo)

    try:
        drop_page_cache()
        started = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            sum(ex.map(one, range(len(where) // per_mib)))
        return len(where) * BS / (time.monotonic() - started) / MiB
    finally:
        for fd in fds:
            os.close(fd)


def engine_volume(folder: str, region: int):
    from lsbd.engine.volume import Volume
    from lsbd.meta.config import create_volume
    from lsbd.store import open_store
    store = open_store("file://" + os.path.join(folder, "store"))
    cache = os.path.join(folder, "cache")
    if not os.path.exists(os.path.join(folder, "written")):
        create_volume(store, "frag", 1 << 40, compression="none")
        vol = Volume.open(store, "frag", cache_root=cache)
        data = os.urandom(MiB)
        for i in range(region // MiB):
            vol.write(i * MiB, data)
        rnd = random.Random(1)
        block = os.urandom(BS)
        for _ in range(region // BS):
            vol.write(rnd.randrange(region // BS) * BS, block)
        vol.close()
        open(os.path.join(folder, "written"), "w").close()
    return store, Volume.open(store, "frag", cache_root=cache)


def engine_pass(vol, region: int, cold: bool) -> float:
    if cold:
        drop_page_cache()
    started = time.monotonic()
    for i in range(region // MiB):
        vol.read(i * MiB, MiB)
    return region / (time.monotonic() - started) / MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--region", default="1G")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--disk", action="store_true")
    ap.add_argument("--engine", action="store_true")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--keep", help="reuse (or leave) the files and the volume here")
    args = ap.parse_args()
    region = parse_size(args.region) // FILE * FILE
    if region <= 0:
        sys.exit(f"--region must be at least {FILE >> 20} MiB")
    both = not args.disk and not args.engine
    folder = args.keep or work_dir("lsbd-frag-layout-", args.workdir)
    os.makedirs(folder, exist_ok=True)
    print(f"region {region >> 20} MiB; work dir {folder}; load average "
          f"{os.getloadavg()[0]:.1f} (2 cores, shared)", flush=True)
    try:
        if args.disk or both:
            disk = os.path.join(folder, "disk")
            os.makedirs(disk, exist_ok=True)
            nfiles = disk_files(disk, region)
            for p in range(args.passes):
                line = ", ".join(f"{kind} {disk_pass(disk, nfiles, kind):.0f}"
                                 for kind in ("scattered", "whole", "sorted"))
                print(f"disk, pass {p + 1}: {line} MiB/s", flush=True)
        if args.engine or both:
            engine = os.path.join(folder, "engine")
            os.makedirs(engine, exist_ok=True)
            store, vol = engine_volume(engine, region)
            try:
                for p in range(args.passes):
                    cold = engine_pass(vol, region, True)
                    warm = engine_pass(vol, region, False)
                    print(f"engine, one thread, pass {p + 1}: cold {cold:.0f}, warm {warm:.0f} "
                          f"MiB/s", flush=True)
            finally:
                vol.close()
                store.close()
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
