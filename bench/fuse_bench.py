#!/usr/bin/env python3
"""FUSE front end benchmark: lsbd's mount against its peers, alternated in one run.

    sudo .venv/bin/python bench/fuse_bench.py [--runtime 6] [--size 1G] [--rounds 2]
        [--targets image,ext4] [--queues 1,2] [--old-frontend DIR]
        [--subjects ...] [--json FILE] [--keep]

Every subject gets the same fio jobs (libaio, iodepth 16, O_DIRECT):
sequential 1 MiB writes and reads, random 4 KiB writes and reads, over the
same region, which is first filled with an untimed sequential write (a read
of a block never written is answered from nothing, which would flatter
reads).  The subjects are mounted side by side and each job runs on one
after the other, `--rounds` times: the machine's load changes by the
minute, so only figures of the same round compare.  The report gives each
subject's best round and its ratio to lsbd's NBD path and to the old front
end, from the same rounds.

Two paths:
  image  fio straight on the image file
  ext4   mkfs.ext4 on a loop device (direct I/O) over the image, fio on a
         file inside it

Subjects:
  lsbd-qN   `lsbd mount` with N queues (LSBD_FUSE_QUEUES), file:// store in
            the work directory
  old       (--old-frontend DIR) the same, with the lsbd_fuse package found
            first in DIR: the pyfuse3 front end of before #14, copied there
            with `git archive eefef39^ fuse/lsbd_fuse | tar -x -C DIR
            --strip-components=1` (it needs `pip install pyfuse3 trio` in
            the venv, which builds against libfuse3-dev)
  nbd       `lsbd serve` of the same kind of volume, fio's nbd engine (libnbd)
            over a Unix socket; image path only (this kernel has no nbd
            module for a block device to loop-mount)
  bindfs    bindfs (C, libfuse) over a file on tmpfs: a C FUSE file system
            over RAM, the ceiling for any FUSE server here
  s3backer  s3backer --test --blockSize=4M: blocks as files in a directory,
            its block cache in memory (its test mode also sleeps at random
            on block operations: a network imitation, not a FUSE ceiling)

Targets (#14): lsbd >= 0.8x nbd on every job; random 4 KiB writes >= 3x and
reads >= 2.5x the old front end.  Needs root, fio, e2fsprogs, /dev/fuse, and
for the peers bindfs and s3backer.  Not a test: compare within a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import fio, nbd_server, parse_size, sh, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOBS = [
    # name, fio rw, block size
    ("seq write 1M", "write", "1M"),
    ("rand write 4k", "randwrite", "4k"),
    ("seq read 1M", "read", "1M"),
    ("rand read 4k", "randread", "4k"),
]
#: job -> (ratio to nbd, ratio to the old front end) that lsbd should reach.
TARGETS = {
    "seq write 1M": (0.8, None),
    "rand write 4k": (0.8, 3.0),
    "seq read 1M": (0.8, None),
    "rand read 4k": (0.8, 2.5),
}


# --- the subjects: each yields what fio is pointed at ------------------------------

def lsbd_cmd(work: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "lsbd.cli.main", "--store", f"file://{work}/store",
            "--cache-dir", f"{work}/cache", *args]


@contextlib.contextmanager
def lsbd_mount(work: str, vol: str, size: int, *, queues: int = 1, pythonpath: str = ""):
    env = {**os.environ, "LSBD_FUSE_QUEUES": str(queues)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    mnt = os.path.join(work, f"mnt-{vol}")
    os.makedirs(mnt, exist_ok=True)
    sh(*lsbd_cmd(work, "create", vol, "--size", str(size)))
    sh(*lsbd_cmd(work, "mount", vol, mnt), env=env)
    try:
        yield os.path.join(mnt, f"{vol}.img")
    finally:
        if sh(*lsbd_cmd(work, "umount", mnt), check=False, env=env).returncode:
            sh("fusermount3", "-u", "-z", mnt, check=False)


@contextlib.contextmanager
def lsbd_nbd(work: str, vol: str, size: int):
    sh(*lsbd_cmd(work, "create", vol, "--size", str(size)))
    sock = os.path.join(work, f"{vol}.sock")
    with nbd_server(lsbd_cmd(work, "serve", vol, "--socket", sock), sock, vol,
                    log=os.path.join(work, f"{vol}.log")) as uri:
        yield uri


@contextlib.contextmanager
def bindfs_mount(work: str, size: int):
    ram, mnt = os.path.join(work, "tmpfs"), os.path.join(work, "mnt-bindfs")
    os.makedirs(ram, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", f"size={size + (64 << 20)}", "tmpfs", ram)
    try:
        with open(os.path.join(ram, "file"), "wb") as f:
            f.truncate(size)
        sh("bindfs", "-o", "direct_io", ram, mnt)
        try:
            yield os.path.join(mnt, "file")
        finally:
            if sh("fusermount", "-u", mnt, check=False).returncode:
                sh("fusermount", "-u", "-z", mnt, check=False)
    finally:
        for _ in range(50):
            if sh("umount", ram, check=False).returncode == 0:
                break
            time.sleep(0.1)


@contextlib.contextmanager
def s3backer_mount(work: str, size: int):
    blocks, mnt = os.path.join(work, "s3backer-blocks"), os.path.join(work, "mnt-s3backer")
    os.makedirs(blocks, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    sh("s3backer", "--test", "--blockSize=4M", f"--size={size}", blocks, mnt)
    wait_for(os.path.join(mnt, "file"), timeout=10)
    try:
        yield os.path.join(mnt, "file")
    finally:
        for tool in ("fusermount", "fusermount3"):
            if sh(tool, "-u", mnt, check=False).returncode == 0:
                break
        else:
            sh("fusermount3", "-u", "-z", mnt, check=False)
        time.sleep(0.5)


@contextlib.contextmanager
def ext4_on(image: str, work: str, label: str):
    """mkfs.ext4 on a loop device (direct I/O) over the image, mounted;
    yields the path of the fio file inside."""
    dev = sh("losetup", "-f", "--show", "--direct-io=on", image).stdout.strip()
    mnt = os.path.join(work, f"ext4-{label}")
    os.makedirs(mnt, exist_ok=True)
    try:
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
           dev)
        sh("mount", dev, mnt)
        try:
            yield os.path.join(mnt, "fio.dat")
        finally:
            if sh("umount", mnt, check=False).returncode:
                sh("umount", "-l", mnt, check=False)
    finally:
        sh("losetup", "-d", dev, check=False)


# --- the run -----------------------------------------------------------------------

def subjects_for(args: argparse.Namespace, work: str, vol_size: int) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    wanted = args.subjects.split(",")
    for q in (int(x) for x in args.queues.split(",")):
        out.append((f"lsbd-q{q}", lambda q=q: lsbd_mount(work, f"q{q}", vol_size, queues=q)))
    if args.old_frontend and "old" in wanted:
        out.append(("old", lambda: lsbd_mount(work, "old", vol_size,
                                              pythonpath=args.old_frontend)))
    if "nbd" in wanted:
        out.append(("nbd", lambda: lsbd_nbd(work, "nbd", vol_size)))
    if "bindfs" in wanted and shutil.which("bindfs"):
        out.append(("bindfs", lambda: bindfs_mount(work, vol_size)))
    if "s3backer" in wanted and shutil.which("s3backer"):
        out.append(("s3backer", lambda: s3backer_mount(work, vol_size)))
    return out


def run_target(target: str, subjects, work: str, *, size: str, runtime: int,
               rounds: int) -> dict[str, dict[str, list[dict]]]:
    results: dict[str, dict[str, list[dict]]] = {}
    with contextlib.ExitStack() as stack:
        paths: dict[str, str] = {}
        for label, opener in subjects:
            if target == "ext4" and label == "nbd":
                continue  # no kernel nbd device to loop-mount
            path = stack.enter_context(opener())  # type: ignore[operator]
            if target == "ext4":
                path = stack.enter_context(ext4_on(path, work, label))
            paths[label] = path
            fill = fio(path, "write", "1M", size=size, runtime=None)
            print(f"  {label:9} fill {fill['mib_s']:8.1f} MiB/s (untimed)", flush=True)
            results[label] = {name: [] for name, _rw, _bs in JOBS}
        for name, rw, bs in JOBS:
            for r in range(rounds):
                for label, path in paths.items():
                    try:
                        got = fio(path, rw, bs, size=size, runtime=runtime)
                    except (subprocess.CalledProcessError, RuntimeError) as e:
                        err = getattr(e, "stderr", "") or str(e)
                        got = {"mib_s": 0.0, "iops": 0.0, "error": err.strip()[-200:]}
                    results[label][name].append(got)
                    print(f"  {name:14} round {r + 1} {label:9} {got['mib_s']:9.1f} MiB/s "
                          f"{got['iops']:9.0f} IOPS", flush=True)
    return results


def report(all_results: dict, labels: list[str]) -> None:
    for target, results in all_results.items():
        here = [lb for lb in labels if lb in results]
        print(f"\n{target}: best round, MiB/s (IOPS); ratios are per round, min-max")
        print(f"  {'job':14} " + "  ".join(f"{lb:>20}" for lb in here))
        for name, _rw, _bs in JOBS:
            if not results[here[0]][name]:
                continue
            cells = []
            for lb in here:
                best = max(results[lb][name], key=lambda r: r["iops"])
                cells.append(f"{best['mib_s']:8.1f} ({best['iops']:8.0f})")
            print(f"  {name:14} " + "  ".join(f"{c:>20}" for c in cells))
        for lb in here:
            if not lb.startswith("lsbd"):
                continue
            for ref, index in (("nbd", 0), ("old", 1)):
                if ref not in results:
                    continue
                line = []
                for name, _rw, _bs in JOBS:
                    ratios = [a["iops"] / b["iops"] for a, b in
                              zip(results[lb][name], results[ref][name]) if b["iops"]]
                    want = TARGETS[name][index]
                    if not ratios:
                        continue
                    verdict = "" if want is None else (" ok" if min(ratios) >= want
                                                       else f" BELOW {want:g}x in a round")
                    line.append(f"{name} {min(ratios):.2f}-{max(ratios):.2f}x{verdict}")
                print(f"  {lb} / {ref}: " + "; ".join(line))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=int, default=6, help="seconds per fio job")
    p.add_argument("--size", default="1G", help="fio region (the images are twice this)")
    p.add_argument("--rounds", type=int, default=2, help="times each job runs on each subject")
    p.add_argument("--targets", default="image,ext4", help="image, ext4 or both")
    p.add_argument("--queues", default="1,2", help="lsbd subjects: numbers of queues")
    p.add_argument("--old-frontend", metavar="DIR",
                   help="a directory holding the lsbd_fuse package of an earlier front end")
    p.add_argument("--subjects", default="old,nbd,bindfs,s3backer",
                   help="which peers to run (of old, nbd, bindfs, s3backer)")
    p.add_argument("--jobs", help="only these jobs (comma-separated, e.g. 'seq read 1M')")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--workdir", help="where to put stores and mounts (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()

    if os.geteuid() != 0:
        print("fuse_bench: needs root (loop devices, tmpfs)", file=sys.stderr)
        return 2
    for tool in ("fio", "mkfs.ext4", "losetup"):
        if not shutil.which(tool):
            print(f"fuse_bench: {tool} is missing", file=sys.stderr)
            return 2
    if args.jobs:
        JOBS[:] = [j for j in JOBS if j[0] in args.jobs.split(",")]
    region = parse_size(args.size)
    vol_size = 2 * region
    work = args.workdir or tempfile.mkdtemp(prefix="lsbd-fuse-bench-")
    os.makedirs(work, exist_ok=True)
    all_results: dict[str, dict] = {}
    labels: list[str] = []
    try:
        for target in args.targets.split(","):
            fresh = tempfile.mkdtemp(prefix=f"{target}-", dir=work)
            subjects = subjects_for(args, fresh, vol_size)
            labels = [lb for lb, _ in subjects]
            print(f"{target}:", flush=True)
            all_results[target] = run_target(target, subjects, fresh, size=args.size,
                                             runtime=args.runtime, rounds=args.rounds)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(all_results, labels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runtime": args.runtime, "size": args.size, "rounds": args.rounds,
                       "results": all_results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
