#!/usr/bin/env python3
"""FUSE front end benchmark: lsbd mount vs s3backer, side by side, one run.

    sudo .venv/bin/python bench/fuse_bench.py [--runtime 10] [--size 1G]
        [--targets image,ext4] [--page-cache] [--json FILE] [--keep]

Both image files get the same fio jobs (libaio, iodepth 16, O_DIRECT):
sequential 1 MiB writes and reads, random 4 KiB writes and reads, over the
same region.  Two paths are measured:

  image  fio straight on the image file (lsbd: MNT/VOL.img, s3backer: MNT/file)
  ext4   mkfs.ext4 on a loop device over the image, fio on a file inside it.
         The loop device uses direct I/O (--loop dio, the default): a buffered
         loop device serves s3backer's image (which is page-cached) from RAM
         at 5 GB/s and measures the page cache, not the FUSE server.

The peer is s3backer in its local test mode with 4 MiB blocks (`--test
--blockSize=4M`: blocks are files in a directory; its default 4 KiB blocks are
unusably slow).  lsbd uses a file:// store in the same temporary directory.
Both keep their caches warm between jobs (s3backer's block cache in memory,
lsbd's segment cache in local files); --cold drops the page cache before reads.

It prints MiB/s and IOPS per job and the ratio lsbd / s3backer, with the
targets (>= 2x on writes, >= 1x on reads).  Needs root, fio, s3backer,
e2fsprogs and /dev/fuse.  Not a test: figures are noisy, compare within a run.
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

JOBS = [
    # name, fio rw, block size, target ratio
    ("seq write 1M", "write", "1M", 2.0),
    ("rand write 4k", "randwrite", "4k", 2.0),
    ("seq read 1M", "read", "1M", 1.0),
    ("rand read 4k", "randread", "4k", 1.0),
]


def sh(*cmd: str, check: bool = True, quiet: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True,
                          stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.PIPE if quiet else None, **kw)


def ensure_fusectl() -> None:
    """lsbd raises its FUSE connection's max_background through fusectl,
    which systemd mounts at boot; a bare container may lack it."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[2] == "fusectl" for line in f):
            return
    if sh("mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections",
          check=False).returncode == 0:
        print("mounted fusectl on /sys/fs/fuse/connections (as systemd does)", flush=True)


def drop_caches() -> None:
    sh("sync")
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fio(path: str, rw: str, bs: str, *, size: str, runtime: int | None) -> dict:
    timing = [f"--runtime={runtime}", "--time_based"] if runtime else []
    r = sh("fio", "--name=bench", f"--filename={path}", "--ioengine=libaio", "--direct=1",
           "--iodepth=16", f"--rw={rw}", f"--bs={bs}", f"--size={size}", *timing,
           "--randrepeat=0", "--norandommap", "--output-format=json")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"mib_s": side["bw"] / 1024, "iops": side["iops"]}


def run_jobs(path: str, *, size: str, runtime: int, cold: bool) -> dict[str, dict]:
    # Fill the whole region first, untimed: a read of a block never written
    # is answered from nothing (s3backer knows its zero blocks, ext4 its
    # unwritten extents), and a time-based write job leaves a slow subject
    # with a mostly empty region, which would flatter its reads.
    out = {"fill": fio(path, "write", "1M", size=size, runtime=None)}
    print(f"    {'fill 1M':14} {out['fill']['mib_s']:9.1f} MiB/s (untimed, whole region)",
          flush=True)
    for name, rw, bs, _target in JOBS:
        if cold and "read" in rw:
            drop_caches()
        try:
            out[name] = fio(path, rw, bs, size=size, runtime=runtime)
        except subprocess.CalledProcessError as e:
            err = (e.stderr or e.stdout or "").strip().splitlines()
            print(f"    {name:14} FAILED: {err[-1] if err else e}", flush=True)
            out[name] = {"mib_s": 0.0, "iops": 0.0, "error": err[-1] if err else str(e)}
            continue
        print(f"    {name:14} {out[name]['mib_s']:9.1f} MiB/s {out[name]['iops']:9.0f} IOPS",
              flush=True)
    return out


@contextlib.contextmanager
def ext4_on(image: str, work: str, label: str, *, loop_dio: bool):
    """mkfs.ext4 on a loop device over the image and mount it; yields the
    path of the fio file inside."""
    args = ["losetup", "-f", "--show", *(["--direct-io=on"] if loop_dio else []), image]
    dev = sh(*args).stdout.strip()
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


# --- the two subjects ------------------------------------------------------------

def lsbd(*args: str, work: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lsbd.cli.main", "--store", f"file://{work}/store",
           "--cache-dir", f"{work}/cache", *args]
    return sh(*cmd, check=check)


@contextlib.contextmanager
def lsbd_mount(work: str, size_bytes: int, *, page_cache: bool):
    mnt = os.path.join(work, "lsbd-mnt" + ("-pc" if page_cache else ""))
    os.makedirs(mnt, exist_ok=True)
    vol = "benchpc" if page_cache else "bench"
    lsbd("create", vol, "--size", str(size_bytes), work=work)
    lsbd("mount", vol, mnt, *(["--page-cache"] if page_cache else []), work=work)
    try:
        yield os.path.join(mnt, f"{vol}.img"), mnt
    finally:
        if lsbd("umount", mnt, work=work, check=False).returncode:
            sh("fusermount3", "-u", "-z", mnt, check=False)


@contextlib.contextmanager
def s3backer_mount(work: str, size_bytes: int):
    blocks = os.path.join(work, "s3backer-blocks")
    mnt = os.path.join(work, "s3backer-mnt")
    os.makedirs(blocks, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    sh("s3backer", "--test", "--blockSize=4M", f"--size={size_bytes}", blocks, mnt)
    for _ in range(100):
        if os.path.exists(os.path.join(mnt, "file")):
            break
        time.sleep(0.05)
    try:
        yield os.path.join(mnt, "file"), mnt
    finally:
        for tool in ("fusermount", "fusermount3"):
            if sh(tool, "-u", mnt, check=False).returncode == 0:
                break
        else:
            sh("fusermount3", "-u", "-z", mnt, check=False)
        time.sleep(0.5)


def rss_of_mount(mnt: str) -> int | None:
    """Resident memory (bytes) of the lsbd process serving `mnt`, if known."""
    try:
        from lsbd_fuse.mounts import read_pid_file
    except ImportError:
        return None
    server = read_pid_file(mnt)
    if server is None:
        return None
    with contextlib.suppress(OSError), open(f"/proc/{server.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


# --- the run -----------------------------------------------------------------------

def measure(subjects, target: str, work: str, *, size: str, runtime: int, cold: bool,
            loop_dio: bool) -> dict:
    results = {}
    for label, opener in subjects:
        print(f"  {label} / {target}", flush=True)
        with opener() as (image, mnt):
            if target == "image":
                results[label] = run_jobs(image, size=size, runtime=runtime, cold=cold)
            else:
                with ext4_on(image, work, label, loop_dio=loop_dio) as path:
                    results[label] = run_jobs(path, size=size, runtime=runtime, cold=cold)
            rss = rss_of_mount(mnt)
            if rss is not None:
                results[label]["rss_mib"] = rss / 2**20
    return results


def report(all_results: dict, labels: list[str]) -> bool:
    ok = True
    ref = "s3backer"
    for target, results in all_results.items():
        print(f"\n{target}: MiB/s (IOPS)   " + "   ".join(labels) + "   ratio vs s3backer")
        for name, _rw, _bs, want in JOBS:
            cells = []
            for label in labels:
                r = results[label][name]
                cells.append("     FAILED      " if "error" in r
                             else f"{r['mib_s']:8.1f} ({r['iops']:7.0f})")
            line = f"  {name:14} " + "  ".join(cells)
            for label in labels:
                if label == ref:
                    continue
                base = results[ref][name]["iops"]
                ratio = results[label][name]["iops"] / base if base else float("inf")
                verdict = "ok" if ratio >= want else f"BELOW {want:g}x"
                if label == "lsbd":
                    ok = ok and ratio >= want
                line += f"   {label}: {ratio:6.2f}x {verdict}"
            print(line)
        for label in labels:
            if "rss_mib" in results[label]:
                print(f"  {label} RSS after the run: {results[label]['rss_mib']:.0f} MiB")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    p.add_argument("--size", default="1G", help="fio region (the volumes are twice this)")
    p.add_argument("--targets", default="image,ext4", help="image, ext4 or both")
    p.add_argument("--page-cache", action="store_true",
                   help="also measure lsbd mounted without direct_io (page cache mode)")
    p.add_argument("--loop", choices=["dio", "buffered"], default="dio",
                   help="ext4 target: loop device with direct I/O (default: neither image "
                        "is read from the page cache) or buffered, as `mount -o loop` does")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each read job (this also drops lsbd's "
                        "segment cache, which lives in files; s3backer's is in its memory)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--workdir", help="where to put stores and mounts (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()

    if os.geteuid() != 0:
        print("fuse_bench: needs root (loop mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("fio", "s3backer", "mkfs.ext4", "fusermount3"):
        if not shutil.which(tool):
            print(f"fuse_bench: {tool} is missing", file=sys.stderr)
            return 2
    ensure_fusectl()
    region = _parse_size(args.size)
    vol_size = 2 * region
    work = args.workdir or tempfile.mkdtemp(prefix="lsbd-fuse-bench-")
    os.makedirs(work, exist_ok=True)

    labels = ["lsbd", *(["lsbd-pagecache"] if args.page_cache else []), "s3backer"]

    all_results: dict[str, dict] = {}
    try:
        for target in args.targets.split(","):
            # Fresh volumes per target: the ext4 run starts from empty images.
            fresh = tempfile.mkdtemp(prefix=f"{target}-", dir=work)
            subjects_here = [(label, _rebind(label, fresh, vol_size)) for label in labels]
            print(f"{target}:", flush=True)
            all_results[target] = measure(subjects_here, target, fresh, size=args.size,
                                          runtime=args.runtime, cold=args.cold,
                                          loop_dio=args.loop == "dio")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = report(all_results, labels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runtime": args.runtime, "size": args.size, "results": all_results}, f,
                      indent=1)
    print("\nall targets met" if ok else "\nsome targets not met (see BELOW)")
    return 0


def _rebind(label: str, work: str, vol_size: int):
    if label == "s3backer":
        return lambda: s3backer_mount(work, vol_size)
    return lambda: lsbd_mount(work, vol_size, page_cache=(label == "lsbd-pagecache"))


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


if __name__ == "__main__":
    sys.exit(main())
