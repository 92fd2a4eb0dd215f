#!/usr/bin/env python3
"""NBD front end benchmark: `lsbd serve` vs nbdkit's file plugin, one run.

    .venv/bin/python bench/nbd_bench.py [--runtime 10] [--size 1G]
        [--flush-mode journal|store] [--memory] [--json FILE] [--keep]

Every subject gets the same fio jobs through fio's nbd engine (libnbd) at
iodepth 16 over a Unix socket: sequential 1 MiB writes and reads, random
4 KiB writes and reads, over the same region, which is first filled with an
untimed sequential write (a read of a never-written block is answered from
nothing, which would flatter reads).

Subjects:
  nbdkit   nbdkit's file plugin on a file in the temporary directory: the C
           reference server over the same disk, the ceiling for any NBD server.
  lsbd     `lsbd serve` of a volume in a file:// store in the same directory.
  memory   (--memory) the lsbd NBD server over an in-memory volume (the test
           suite's FakeVolume): the protocol layer alone, without the engine.
  disk     with the sequential write job: fio writing a new file with O_DIRECT
           in the same directory, the disk's own speed for what a log does.
           lsbd puts every byte it takes on this disk; nbdkit's file plugin
           rewrites cached pages, so its figure can be well above the disk's.

It prints MiB/s and IOPS per job and the ratios to nbdkit, with the targets
(random writes >= 1x nbdkit, random reads and sequential >= 0.5x).  Each
subject starts with the page cache dropped (as root; see drop_page_cache).  Not a
test: figures are noisy, compare within one run.  Needs fio and nbdkit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from benchlib import drop_page_cache, fio, nbd_server, nbdkit, parse_size, sh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOBS = [
    # name, fio rw, block size, target ratio to nbdkit.  Reads run three
    # times: after the sequential fill (data laid out in order), after the
    # random writes (a log-structured store is fragmented until compaction;
    # nbdkit's file plugin writes in place, so for it they are all the same),
    # and after `lsbd compact --defrag` (nothing to do for the others).
    ("seq write 1M", "write", "1M", 0.5),
    ("seq read 1M", "read", "1M", 0.5),
    ("rand read 4k", "randread", "4k", 0.5),
    ("rand write 4k", "randwrite", "4k", 1.0),
    ("seq read 1M frag", "read", "1M", 0.5),
    ("rand read 4k frag", "randread", "4k", 0.5),
    ("seq read 1M defrag", "read", "1M", 0.5),
    ("rand read 4k defrag", "randread", "4k", 0.5),
]
#: uri -> how to defragment that subject before the "defrag" jobs (lsbd only).
DEFRAG: dict = {}


def disk_write(workdir: str, *, runtime: int) -> dict | None:
    """The disk's own speed for the sequential write job: fio with O_DIRECT
    (no page cache) writing a new file in the same directory, never the same
    place twice, as a log does.  Every byte lsbd takes must reach this disk
    (a log keeps every write, and each segment is synced before it joins
    the map), so this is lsbd's ceiling; nbdkit's file plugin rewrites the
    same cached pages of its image and never waits for the disk.  None if
    there is no room for the file."""
    path = os.path.join(workdir, "disk.img")
    size = 16 << 30   # more than the disk takes in `runtime` seconds here
    if shutil.disk_usage(workdir).free < size + (4 << 30):
        return None
    try:
        r = sh("fio", "--name=disk", "--ioengine=libaio", "--direct=1", f"--filename={path}",
               "--iodepth=16", "--rw=write", "--bs=1M", f"--size={size}",
               f"--runtime={runtime}", "--output-format=json")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    side = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]
    return {"mib_s": side["bw"] / 1024, "iops": side["iops"]}


@contextlib.contextmanager
def lsbd(workdir: str, size: int, flush_mode: str):
    base = [sys.executable, "-m", "lsbd.cli.main", "--store",
            f"file://{os.path.join(workdir, 'store')}", "--cache-dir",
            os.path.join(workdir, "cache")]
    sh(*base, "create", "bench", "--size", str(size), "--flush-mode", flush_mode)
    sock = os.path.join(workdir, "lsbd.sock")
    with nbd_server([*base, "serve", "bench", "--socket", sock], sock, "bench",
                    log=os.path.join(workdir, "lsbd.log")) as uri:
        # Through the serving process (its control socket), as a user would.
        DEFRAG[uri] = lambda: sh(*base, "compact", "bench", "--defrag")
        yield uri


@contextlib.contextmanager
def memory(workdir: str, size: int):
    sock = os.path.join(workdir, "memory.sock")
    with nbd_server([sys.executable, os.path.abspath(__file__), "--serve-memory", sock,
                     str(size)], sock, "memory", stderr=None) as uri:
        yield uri


def serve_memory(sock: str, size: int) -> None:
    """The lsbd NBD server over an in-memory volume, until SIGTERM."""
    sys.path.insert(0, os.path.join(REPO, "tests", "support"))
    from fakes import FakeVolume

    from lsbd_nbd import NBDServer

    server = NBDServer({"memory": FakeVolume("memory", size)})
    server.listen_unix(sock)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    server.serve_forever()
    server.close()


def run_subject(name: str, uri: str, *, size: str, runtime: int,
                jobs: list | None = None) -> dict[str, dict]:
    print(f"  {name}", flush=True)
    out = {"fill": fio(uri, "write", "1M", size=size, runtime=None)}
    print(f"    {'fill 1M':14} {out['fill']['mib_s']:9.1f} MiB/s (untimed, whole region)",
          flush=True)
    for job, rw, bs, _target in jobs or JOBS:
        if job == "seq read 1M defrag" and uri in DEFRAG:
            started = time.monotonic()
            DEFRAG[uri]()
            print(f"    {'(lsbd compact --defrag took ' + format(time.monotonic() - started, '.1f') + ' s)'}",
                  flush=True)
        out[job] = r = fio(uri, rw, bs, size=size, runtime=runtime)
        print(f"    {job:18} {r['mib_s']:9.1f} MiB/s {r['iops']:10.0f} IOPS", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=10, help="seconds per timed job (default 10)")
    ap.add_argument("--size", default="1G", help="region fio works on (default 1G)")
    ap.add_argument("--flush-mode", choices=["journal", "store"], default="journal")
    ap.add_argument("--memory", action="store_true",
                    help="also measure the NBD server over an in-memory volume")
    ap.add_argument("--subjects", default=None, metavar="LIST",
                    help="comma-separated subset of nbdkit,lsbd,memory (nbdkit is always run)")
    ap.add_argument("--jobs", default=None, metavar="LIST",
                    help="comma-separated subset of the jobs, by name (default: all)")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--serve-memory", nargs=2, metavar=("SOCKET", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_memory:
        serve_memory(args.serve_memory[0], int(args.serve_memory[1]))
        return 0
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"nbd_bench: {tool} is needed", file=sys.stderr)
            return 2

    jobs = JOBS
    if args.jobs:
        wanted_jobs = [j.strip() for j in args.jobs.split(",")]
        unknown = set(wanted_jobs) - {j[0] for j in JOBS}
        if unknown:
            print(f"nbd_bench: unknown jobs {sorted(unknown)}; jobs are: "
                  + ", ".join(j[0] for j in JOBS), file=sys.stderr)
            return 2
        jobs = [j for j in JOBS if j[0] in wanted_jobs]
    size = parse_size(args.size)
    workdir = tempfile.mkdtemp(prefix="lsbd-nbd-bench-", dir="/var/tmp")
    results: dict[str, dict] = {}
    disk = None
    try:
        print(f"fio nbd engine, iodepth 16, {args.size} region, {args.runtime}s per job; "
              f"work dir {workdir}")
        wanted = set((args.subjects or "nbdkit,lsbd").split(",")) | {"nbdkit"}
        if args.memory:
            wanted.add("memory")
        subjects = [("nbdkit", lambda: nbdkit(workdir, size)),
                    ("lsbd", lambda: lsbd(workdir, size, args.flush_mode)),
                    ("memory", lambda: memory(workdir, size))]
        for name, start in subjects:
            if name not in wanted:
                continue
            if not drop_page_cache():
                print("  (not root: the page cache is not dropped between subjects)")
            with start() as uri:
                results[name] = run_subject(name, uri, size=args.size, runtime=args.runtime,
                                            jobs=jobs)
        if any(job[0] == "seq write 1M" for job in jobs):
            disk = disk_write(workdir, runtime=args.runtime)
            print("  disk (fio, O_DIRECT, a new file on the same file system)\n    "
                  + (f"{'seq write 1M':18} {disk['mib_s']:9.1f} MiB/s" if disk else
                     "not measured: no room for its file"), flush=True)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    others = [n for n in results if n != "nbdkit"]
    print()
    header = f"{'job':18} {'nbdkit':>14}" + "".join(f" {n:>14} {'ratio':>6}" for n in others)
    print(header + f" {'target':>7}")
    for job, _rw, _bs, target in jobs:
        unit = "iops" if job.startswith("rand") else "mib_s"
        fmt = (lambda v: f"{v:9.0f} IOPS") if unit == "iops" else (lambda v: f"{v:8.0f} MiB/s")
        base = results["nbdkit"][job][unit]
        row = f"{job:18} {fmt(base):>14}"
        for n in others:
            value = results[n][job][unit]
            row += f" {fmt(value):>14} {value / base:6.2f}"
        print(row + f" {'>= ' + format(target, 'g'):>7}")
    if disk is not None and "lsbd" in results:
        lsbd_mib_s = results["lsbd"]["seq write 1M"]["mib_s"]
        print(f"\nseq write 1M: the disk takes {disk['mib_s']:.0f} MiB/s with O_DIRECT; lsbd "
              f"{lsbd_mib_s:.0f} MiB/s is {lsbd_mib_s / disk['mib_s']:.2f} of that ceiling, "
              f"nbdkit (page cache) {results['nbdkit']['seq write 1M']['mib_s'] / disk['mib_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runtime": args.runtime, "size": args.size, "results": results,
                       "disk": disk}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
