#!/usr/bin/env python3
"""lsbd and s3backer against a distant store, in one run (#17).

    sudo .venv/bin/python bench/distant_bench.py [--delays 10,40] [--fio-runtime 10]
        [--small-mib 130] [--big-mib 256] [--skip-fio] [--json FILE]

A moto S3 server runs in a child process, every object in its memory (moto
spills objects over 5 MiB to files on this machine's disk unless told not to:
see MOTO_IN_MEMORY); a TCP proxy (bench/delay_proxy.py)
in front of it forwards every chunk `delay` ms late in each direction.  For
each delay, lsbd (`lsbd mount`, its FUSE image) and s3backer (1 MiB blocks,
otherwise its defaults) go through the same workflow, each in its own bucket:

  mkfs        mkfs.ext4 on the 4 GiB image
  copy+sync   mount -o loop, copy a tree of small files (--small-mib) and one
              large file (--big-mib), sync
  unmount     umount, then unmount the image until everything is in the store
              (`lsbd umount` returns then; s3backer when its process exits)
  cold read + diff
              a new cache (lsbd: a new cache dir; s3backer: a new process),
              page cache dropped, once the disk is quiet (wait_for_quiet_disk):
              attach, mount -o loop, `diff -r -q` of the source tree against
              the mounted one, timed whole (the cold read of the runs before
              2026-12-06: it reads the source tree from this disk as well)
  cold read   the same on another new cache, the page cache dropped again, but
              the timed part reads only the mounted tree: attach, mount, and
              every file read whole in 1 MiB chunks, in diff's order, by a
              child process (READ_TREE); then, untimed, `diff -r -q` against
              the source compares what that read left in the page cache
  warm read   on the same cache, the page cache dropped: mount and `diff -r -q`
              against the source, timed whole (the local path, and the source)
  source read the source tree alone, from a dropped page cache
  fio         4 KiB random writes and reads, 1 MiB writes and reads, on the
              image (libaio, O_DIRECT, iodepth 16), and for lsbd over NBD
              (`lsbd serve`, fio's nbd engine)

It reports the times, the store requests by kind, and bytes up and down per
GiB written (GiB of files copied), and the targets against s3backer from the
same run: cold read >= 2x faster (and the cold read + diff, as before),
copy+sync+unmount >= 3x faster, <= 40 PUTs and <= 1.1 GiB uploaded per GiB
written.  Needs root, /dev/fuse, loop devices, e2fsprogs, fio and s3backer.
Not a test: compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from delay_proxy import DelayProxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LSBD = os.path.join(REPO, ".venv", "bin", "lsbd")
MiB = 1 << 20
GiB = 1 << 30

# --- moto in a child process, counting requests by kind ---------------------------------

MOTO_CHILD = r"""
import json, sys, threading, logging, time
from collections import Counter
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.moto_server.werkzeug_app import MotoRequestHandler
from werkzeug.serving import make_server
logging.getLogger("werkzeug").setLevel(logging.ERROR)
counts, lock = Counter(), threading.Lock()
log = []
def what(path):
    # lsbd's keys by the kind of object (volumes/<v>/<what>/...); s3backer's blocks
    parts = path.strip("/").split("/")
    if len(parts) >= 4 and parts[1] == "d" and parts[2] == "volumes":
        return parts[4] if len(parts) > 4 and parts[4] != "config.json" else "config"
    if len(parts) >= 3 and parts[2] == ".lsbd-probe":
        return "probe"
    return "block" if len(parts) >= 2 else ""
def kind(env):
    method, path, query = env["REQUEST_METHOD"], env.get("PATH_INFO", ""), env.get("QUERY_STRING", "")
    key = "/" in path.strip("/")
    if method == "GET":
        if not key:
            return "LIST"
        method = "GET range" if env.get("HTTP_RANGE") else "GET"
    elif method == "PUT" and key and "partNumber" in query:
        method = "PUT part"
    return f"{method} {what(path)}".strip()
app = DomainDispatcherApplication(create_backend_app)
def counting(env, start_response):
    if env.get("PATH_INFO") == "/__log":
        with lock:
            body = json.dumps(log).encode()
            log.clear()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    if env.get("PATH_INFO") == "/__counts":
        with lock:
            body = json.dumps(counts).encode()
            if env["REQUEST_METHOD"] == "POST":
                counts.clear()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    k, t = kind(env), time.monotonic()
    with lock:
        counts[k] += 1
    def logged(body):
        try:
            yield from body
        finally:
            with lock:
                log.append((round(t, 4), round(time.monotonic(), 4), k,
                            env.get("PATH_INFO", ""), env.get("HTTP_RANGE", "")))
                del log[:-100000]
    return logged(app(env, start_response))
server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


#: moto keeps an object in memory up to this size and spills a larger one to a
#: temporary file on this machine's disk.  With its default (5 MiB) lsbd's
#: 32 MiB segments were spilled and s3backer's 1 MiB blocks were not, so the
#: cold read's dropped page cache evicted only lsbd's objects, and moto read
#: them back from the disk lsbd's cache dir and the source tree share (394 MiB
#: of disk reads in a cold read; s3backer's: none).  A distant store's disk is
#: not this machine's: every object stays in memory (--moto-spill: as before).
MOTO_IN_MEMORY = str(4 << 30)


class Moto:
    def __init__(self, spill: bool = False):
        env = dict(os.environ)
        if not spill:
            env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = MOTO_IN_MEMORY
        self.proc = subprocess.Popen([sys.executable, "-c", MOTO_CHILD], stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def disk_read(self) -> float:
        """MiB the server has read from the disk so far (its objects spilled
        to temporary files, read back after the page cache was dropped)."""
        try:
            with open(f"/proc/{self.proc.pid}/io") as f:
                for line in f:
                    if line.startswith("read_bytes:"):
                        return int(line.split()[1]) / MiB
        except OSError:
            pass
        return 0.0

    def counts(self, reset: bool = False) -> dict:
        req = urllib.request.Request(self.url + "/__counts", method="POST" if reset else "GET")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def log(self) -> list:
        """The requests since the last call: (start, end, kind, path, range),
        in seconds of the monotonic clock, by the time they ended."""
        with urllib.request.urlopen(self.url + "/__log", timeout=30) as r:
            return json.loads(r.read())

    def bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# --- helpers -------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True, env=None, timeout: float | None = None):
    return subprocess.run(cmd, check=check, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, timeout=timeout)


def server_memory(mnt: str) -> dict:
    """Peak resident and anonymous resident MiB of the process serving the
    FUSE mount at `mnt` (the one whose command line names it and holds
    /dev/fuse open)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if mnt.encode() not in args or not any(
                    os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"
                    for fd in os.listdir(f"/proc/{pid}/fd")):
                continue
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        return {k: int(status[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon")}
    return {}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def disk_mib() -> tuple[float, float]:
    """MiB read and written so far by this machine's disks, whoever asked:
    the whole disks of /sys/block, not loop, NBD, RAM or device-mapper
    devices (their I/O is a disk's too, or none)."""
    disks = {d for d in os.listdir("/sys/block")
             if not d.startswith(("loop", "nbd", "ram", "zram", "dm-"))}
    read = written = 0
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] in disks:
                read += int(fields[5])
                written += int(fields[9])
    return read * 512 / MiB, written * 512 / MiB


#: Before the cold read: wait for a moment in which this machine's disks
#: write less than QUIET_MIB in QUIET_WINDOW s, for up to QUIET_MAX_WAIT s.
QUIET_MIB, QUIET_WINDOW, QUIET_MAX_WAIT = 1.0, 0.25, 10.0


def wait_for_quiet_disk() -> float:
    """Wait until the disk is quiet (another process's writes, a sync's
    tail), and return how long that took: with the page cache dropped, a
    program's start reads its files one after another, each behind those
    writes (docs/distant.md, "The attach's rare stall")."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < QUIET_MAX_WAIT:
        before = disk_mib()[1]
        time.sleep(QUIET_WINDOW)
        if disk_mib()[1] - before < QUIET_MIB:
            break
    return time.monotonic() - t0


def make_tree(root: str, small_mib: int, big_mib: int) -> int:
    """Small files (4-64 KiB, in folders of 200) and one large file of
    random bytes; returns the bytes written."""
    rng = random.Random(17)
    total = 0
    i = 0
    while total < small_mib * MiB:
        folder = os.path.join(root, "small", f"d{i // 200:03d}")
        os.makedirs(folder, exist_ok=True)
        size = rng.randint(4, 64) * 1024
        with open(os.path.join(folder, f"f{i:05d}"), "wb") as f:
            f.write(os.urandom(size))
        total += size
        i += 1
    with open(os.path.join(root, "large.bin"), "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(MiB))
    return total + big_mib * MiB


def timed(fn, *args) -> float:
    t0 = time.monotonic()
    fn(*args)
    return time.monotonic() - t0


def fio(target: str, rw: str, bs: str, runtime: int, size: str) -> dict:
    if target.startswith("nbd"):
        where = ["--ioengine=nbd", f"--uri={target}"]
    else:
        where = ["--ioengine=libaio", "--direct=1", f"--filename={target}"]
    out = sh("fio", "--name=j", *where, f"--rw={rw}", f"--bs={bs}", "--iodepth=16",
             f"--size={size}", f"--runtime={runtime}", "--time_based", "--output-format=json",
             check=False, timeout=runtime * 6 + 120)
    try:
        job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return {"error": (out.stderr or out.stdout)[-300:]}
    part = job["write"] if "write" in rw else job["read"]
    return {"iops": round(part["iops"], 1), "MiB/s": round(part["bw_bytes"] / MiB, 1)}


FIO_JOBS = [("rand write 4k", "randwrite", "4k"), ("rand read 4k", "randread", "4k"),
            ("write 1M", "write", "1M"), ("read 1M", "read", "1M")]


def fio_all(target: str, runtime: int) -> dict:
    return {name: fio(target, rw, bs, runtime, "1G") for name, rw, bs in FIO_JOBS}


# --- the two subjects ------------------------------------------------------------------


class LsbdSubject:
    name = "lsbd"

    def __init__(self, work: str, endpoint: str, mount_args: tuple[str, ...] = (),
                 exe: str = LSBD, other: int = 0):
        self.work = work
        self.mount_args = mount_args
        self.exe = exe      # another checkout's lsbd, to compare code in one run
        # each variant its own volume, so variants can share the bucket
        self.vol = "-".join(["vol", *(a.strip("-") for a in mount_args),
                             *([f"other{other}"] if other else [])]).replace("=", "-")
        self.env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test",
                        AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
        # lsbd from bytecode: an editable checkout run with
        # PYTHONDONTWRITEBYTECODE compiles its modules at every start.  The
        # first commands (create, the mount for mkfs) write it here.  Not
        # quite as installed: with a prefix, Python reads no __pycache__
        # beside any source, site-packages' included, so a module first
        # imported in a timed phase is compiled there (numpy's first import
        # took 0.43 s against 0.09 s once compiled).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
        self.store = "s3://lsbd-bench/d"
        self.mnt = os.path.join(work, "lsbd-mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.cache = 0

    def lsbd(self, *args: str) -> None:
        sh(self.exe, "--store", self.store, "--cache-dir", os.path.join(self.work, f"cache{self.cache}"),
           *args, env=self.env)

    def create(self) -> None:
        self.lsbd("create", self.vol, "--size", "4G")

    def attach(self, new_cache: bool = False) -> str:
        if new_cache:
            self.cache += 1
        self.lsbd("mount", self.vol, self.mnt, *self.mount_args)
        return os.path.join(self.mnt, f"{self.vol}.img")

    def detach(self) -> None:
        self.lsbd("umount", self.mnt)

    def fio_nbd(self, runtime: int) -> dict:
        sock = os.path.join(self.work, "nbd.sock")
        proc = subprocess.Popen([self.exe, "--store", self.store, "--cache-dir",
                                 os.path.join(self.work, f"cache{self.cache}"), "serve", self.vol,
                                 "--socket", sock], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(sock) and time.monotonic() < deadline:
                time.sleep(0.1)
            return fio_all(f"nbd+unix:///{self.vol}?socket={sock}", runtime)
        finally:
            proc.send_signal(2)
            proc.wait(600)


class S3backerSubject:
    name = "s3backer"

    def __init__(self, work: str, endpoint: str):
        self.work = work
        self.endpoint = endpoint
        self.mnt = os.path.join(work, "s3b-mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def create(self) -> None:
        pass

    def attach(self, new_cache: bool = False) -> str:
        self.proc = subprocess.Popen(
            ["s3backer", "-f", f"--baseURL={self.endpoint}/", "--accessId=test", "--accessKey=test",
             "--blockSize=1M", "--size=4G", "s3b-bench", self.mnt],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        path = os.path.join(self.mnt, "file")
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"s3backer did not start: {self.proc.stderr.read()}")
            time.sleep(0.1)
        return path

    def detach(self) -> None:
        sh("fusermount", "-u", self.mnt)
        self.proc.wait()       # its dirty blocks are written when it exits

    def fio_nbd(self, runtime: int) -> dict:
        return {}


# --- the cold read ---------------------------------------------------------------------

#: The cold read's reader, a child process (the proxy's threads share the
#: bench's interpreter): every file under argv[1] read whole in 1 MiB chunks,
#: in the order `diff -r` reads the mounted tree (each folder's names sorted,
#: a folder's files and subfolders in one order; lost+found left out), so
#: that it differs from the cold read + diff only by the source's read and
#: the comparison.  Prints its start (the monotonic clock), files and bytes.
READ_TREE = r"""
import json, os, sys, time
start = time.monotonic()
buf = bytearray(1 << 20)
files = size = 0
def walk(folder, top):
    global files, size
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            if not (top and entry.name == "lost+found"):
                walk(entry.path, False)
            continue
        with open(entry.path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                size += n
        files += 1
walk(sys.argv[1], True)
print(json.dumps({"start": start, "files": files, "bytes": size}))
"""


def read_tree(root: str) -> dict:
    """Every file under `root` read whole (READ_TREE): its start, files, bytes."""
    return json.loads(sh(sys.executable, "-I", "-S", "-c", READ_TREE, root).stdout)


def same_tree(src: str, mounted: str) -> bool:
    return sh("diff", "-r", "-q", "-x", "lost+found", src, mounted, check=False).returncode == 0


def image_reads(mountpoint: str) -> float:
    """MiB the loop device mounted at `mountpoint` has read so far."""
    device = sh("findmnt", "-n", "-o", "SOURCE", mountpoint).stdout.strip()
    with open(f"/sys/block/{os.path.basename(device)}/stat") as f:
        return int(f.read().split()[2]) * 512 / MiB


def cold_read(subject, fsdir: str, moto: Moto, proxy: DelayProxy, read) -> tuple[dict, str, dict]:
    """Attach on a new cache, the page cache dropped, mount the image and
    call read(), all timed ("s"); returns the figures (read()'s answer as
    "read"), the image and the store's request log."""
    out: dict = {}
    drop_caches()
    proxy.reset_counts()
    moto.counts(reset=True)
    moto.log()
    store_disk = moto.disk_read()
    out["quiet disk wait s"] = wait_for_quiet_disk()
    disk_before = disk_mib()
    t0 = time.monotonic()
    image = subject.attach(new_cache=True)
    out["attach s"] = time.monotonic() - t0
    # The disk while the program starts from a dropped page cache: lsbd
    # reads ~450 files (Python, botocore, its own modules) one after another,
    # and each waits behind whatever else this machine writes meanwhile.  A
    # writer beside it (another process's sync) stalled the attach by 1-2 s
    # before its first request; these say whether that happened (the wait
    # above lowers the odds, it cannot stop a writer that starts later).
    disk_read, disk_written = (b - a for a, b in zip(disk_before, disk_mib()))
    out["machine disk MiB read at attach"] = disk_read
    out["machine disk MiB written at attach"] = disk_written
    sh("mount", "-o", "loop,ro", image, fsdir)
    out["mount s"] = time.monotonic() - t0 - out["attach s"]
    out["read"] = read()
    out["s"] = time.monotonic() - t0
    log = moto.log()
    if log:     # the program's own start, before the store is asked anything
        out["first request s"] = min(start for start, *_ in log) - t0
    out["store disk MiB read"] = moto.disk_read() - store_disk
    out["requests"] = moto.counts(reset=True)
    out["MiB down"] = proxy.bytes_down / MiB
    return out, image, {"t0": t0, "attached": t0 + out["attach s"],
                        "mounted": t0 + out["attach s"] + out["mount s"],
                        "end": t0 + out["s"], "log": log}


#: The cold read's figures under the names of the runs before (where the
#: cold read + diff had them); the cold read + diff's under its label.
COLD_KEYS = {"s": "cold read s", "attach s": "cold attach s", "mount s": "cold mount s",
             "read": "cold read matches", "first request s": "cold attach first request s",
             "quiet disk wait s": "quiet disk wait s (cold read)",
             "machine disk MiB read at attach": "machine disk MiB read (cold attach)",
             "machine disk MiB written at attach": "machine disk MiB written (cold attach)",
             "store disk MiB read": "store disk MiB read (cold read)",
             "requests": "requests (cold read)", "MiB down": "MiB down (cold read)"}
COLD_DIFF_KEYS = {"s": "cold read + diff s", "read": "cold read + diff matches"}


def dump_log(log: dict, path: str) -> None:
    """The store's requests of one step, for DISTANT_LOG=PREFIX."""
    if os.environ.get("DISTANT_LOG"):
        with open(path, "w") as f:
            json.dump(log, f)


# --- the workflow ----------------------------------------------------------------------


def workflow(subject, src: str, work: str, moto: Moto, proxy: DelayProxy, written: int,
             fio_runtime: int, tag: str = "") -> dict:
    out: dict = {}
    log_prefix = f"{os.environ.get('DISTANT_LOG')}{tag}"
    fsdir = os.path.join(work, f"{subject.name}-fs")
    os.makedirs(fsdir, exist_ok=True)
    subject.create()
    image = subject.attach()
    out["mkfs s"] = timed(sh, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", image)
    sh("mount", "-o", "loop", image, fsdir)
    moto.counts(reset=True)
    moto.log()
    proxy.reset_counts()
    t0 = time.monotonic()
    sh("cp", "-a", src + "/.", fsdir)
    os.sync()
    out["copy+sync s"] = time.monotonic() - t0
    t1 = time.monotonic()
    sh("umount", fsdir)
    subject.detach()
    out["unmount s"] = time.monotonic() - t1
    out["copy+sync+unmount s"] = time.monotonic() - t0
    counts = moto.counts(reset=True)
    dump_log({"t0": t0, "synced": t0 + out["copy+sync s"],
              "end": t0 + out["copy+sync+unmount s"], "log": moto.log()}, f"{log_prefix}.copy")
    out["requests (copy)"] = counts
    puts = sum(n for k, n in counts.items() if k.startswith("PUT"))
    out["PUTs per GiB"] = puts * GiB / written
    out["GiB up per GiB"] = proxy.bytes_up / written
    out["GiB down per GiB"] = proxy.bytes_down / written
    # The cold read as every round before measured it (attach, mount, diff
    # against the source), first, so that it runs where it always ran.
    cold_diff, image, log = cold_read(subject, fsdir, moto, proxy, lambda: same_tree(src, fsdir))
    out.update({COLD_DIFF_KEYS.get(k, f"{k} (cold read + diff)"): v for k, v in cold_diff.items()})
    dump_log(log, f"{log_prefix}.cold-diff")
    sh("umount", fsdir)
    subject.detach()
    # The cold read: on another new cache, only the mounted tree read in the
    # timed part; then, untimed, the source compared with what that read
    # left in the page cache (the image's reads during the check say whether
    # it had to read any of it again).
    cold, image, log = cold_read(subject, fsdir, moto, proxy, lambda: read_tree(fsdir))
    tree = cold.pop("read")
    loop = image_reads(fsdir)
    same = same_tree(src, fsdir)
    out["cold read check MiB read from the image"] = image_reads(fsdir) - loop
    out["cold read MiB read"] = tree["bytes"] / MiB
    out["cold read files"] = tree["files"]
    out["cold read reader start s"] = tree["start"] - log["mounted"]
    cold["read"] = same and tree["bytes"] == written
    out.update({COLD_KEYS[k]: v for k, v in cold.items()})
    dump_log(log, f"{log_prefix}.cold")
    # The serving process's memory after the cold read: its peak resident
    # size so far (attach and the cold read) and its anonymous memory now.
    memory = server_memory(subject.mnt)
    if memory:
        out["server peak RSS MiB"] = memory["VmHWM"]
        out["server anon RSS MiB"] = memory["RssAnon"]
        # ... and once the fetched segments held in memory are let go
        # (lsbd.segments.held.IDLE after their last use).
        time.sleep(6)
        later = server_memory(subject.mnt)
        if later:
            out["server anon RSS MiB 6 s later"] = later["RssAnon"]
    sh("umount", fsdir)
    # The same read again with the data in the cache (the page cache dropped):
    # what the local path costs, apart from the store.
    drop_caches()
    t0 = time.monotonic()
    sh("mount", "-o", "loop,ro", image, fsdir)
    sh("diff", "-r", "-q", "-x", "lost+found", src, fsdir, check=False)
    out["warm read s"] = time.monotonic() - t0
    sh("umount", fsdir)
    # And the source tree alone: the share of the read that is the local disk.
    drop_caches()
    out["source read s"] = timed(sh, "sh", "-c", 'find "$0" -type f -exec cat {} + >/dev/null', src)
    if fio_runtime:
        out["fio image"] = fio_all(image, fio_runtime)
    subject.detach()
    if fio_runtime:
        nbd = subject.fio_nbd(fio_runtime)
        if nbd:
            out["fio nbd"] = nbd
    return out


def run_delay(delay_ms: float, src: str, written: int, args) -> dict:
    moto = Moto(spill=args.moto_spill)
    proxy = DelayProxy(("127.0.0.1", moto.port), delay_ms / 1000).start()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    results = {}
    try:
        moto.bucket("lsbd-bench")
        moto.bucket("s3b-bench")
        for name in args.subjects.split(","):
            # "lsbd+direct-io": lsbd mounted with --direct-io (a variant in the same run);
            # "lsbd@/path/to/checkout": that checkout's lsbd (its .venv)
            name_opts, _, checkout = name.partition("@")
            base, *opts = name_opts.split("+")
            work = tempfile.mkdtemp(prefix=f"distant-{base}-", dir=args.workdir)
            try:
                if base == "lsbd":
                    exe = os.path.join(checkout, ".venv", "bin", "lsbd") if checkout else LSBD
                    subject = LsbdSubject(work, endpoint, tuple(f"--{o}" for o in opts), exe,
                                          other=len(results) + 1 if checkout else 0)
                else:
                    subject = S3backerSubject(work, endpoint)
                results[name] = workflow(subject, src, work, moto, proxy, written,
                                         0 if args.skip_fio else args.fio_runtime,
                                         tag=f".{name.replace('/', '_')}.{delay_ms:g}ms")
            finally:
                for d in (os.path.join(work, f"{subject.name}-fs"), getattr(subject, "mnt", "")):
                    if d and os.path.ismount(d):
                        sh("umount", "-l", d, check=False)
                shutil.rmtree(work, ignore_errors=True)
            print(f"  {name} at {delay_ms:g} ms: {json.dumps(results[name])}", flush=True)
    finally:
        proxy.stop()
        moto.stop()
    return results


def report(delay: float, r: dict, name: str = "lsbd") -> list[str]:
    a, b = r[name], r["s3backer"]
    lines = [f"## one-way delay {delay:g} ms", "",
             f"| step | {name} | s3backer | ratio |", "|---|---|---|---|"]
    for key in ("mkfs s", "copy+sync s", "unmount s", "copy+sync+unmount s",
                "cold read + diff s", "cold attach s", "cold mount s", "cold read s",
                "warm read s", "source read s"):
        lines.append(f"| {key} | {a[key]:.1f} | {b[key]:.1f} | {b[key] / a[key]:.1f}x |")
    for key in ("PUTs per GiB", "GiB up per GiB", "GiB down per GiB", "MiB down (cold read)",
                "cold read MiB read", "cold read reader start s",
                "cold read check MiB read from the image",
                "store disk MiB read (cold read)", "quiet disk wait s (cold read)",
                "cold attach first request s",
                "machine disk MiB read (cold attach)", "machine disk MiB written (cold attach)"):
        if key in a and key in b:
            lines.append(f"| {key} | {a[key]:.2f} | {b[key]:.2f} | |")
    for key in ("server peak RSS MiB", "server anon RSS MiB", "server anon RSS MiB 6 s later"):
        if key in a and key in b:
            lines.append(f"| {key} (cold read) | {a[key]:.0f} | {b[key]:.0f} | |")
    for key in ("requests (copy)", "requests (cold read + diff)", "requests (cold read)"):
        lines.append(f"| {key} | {fmt(a[key])} | {fmt(b[key])} | |")
    for where in ("fio image", "fio nbd"):
        for job, _rw, _bs in FIO_JOBS:
            if where in a or where in b:
                x, y = a.get(where, {}).get(job, {}), b.get(where, {}).get(job, {})
                lines.append(f"| {where} {job} | {fio_fmt(x)} | {fio_fmt(y)} | |")
    checks = [
        ("cold read >= 2x faster", b["cold read s"] / a["cold read s"] >= 2),
        ("cold read + diff (as measured before 2026-12-06) >= 2x faster",
         b["cold read + diff s"] / a["cold read + diff s"] >= 2),
        ("copy+sync+unmount >= 3x faster", b["copy+sync+unmount s"] / a["copy+sync+unmount s"] >= 3),
        ("<= 40 PUTs per GiB written", a["PUTs per GiB"] <= 40),
        ("<= 1.1 GiB uploaded per GiB written", a["GiB up per GiB"] <= 1.1),
        ("cold read returns the files", all(r[k] for r in (a, b)
                                            for k in ("cold read matches", "cold read + diff matches"))),
    ]
    lines += [""] + [f"- {'MET' if ok else 'MISSED'}: {name}" for name, ok in checks] + [""]
    return lines


def fmt(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def fio_fmt(x: dict) -> str:
    if not x:
        return "-"
    if "error" in x:
        return "error"
    return f"{x['iops']:.0f} IOPS, {x['MiB/s']:.1f} MiB/s"


def main() -> int:
    # the whole docstring: what each step, the cold read's above all, times
    title, _usage, body = __doc__.split("\n\n", 2)
    ap = argparse.ArgumentParser(description=f"{title}\n\n{body}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delays", default="10,40", help="one-way delays in ms (comma-separated)")
    ap.add_argument("--fio-runtime", type=int, default=10)
    ap.add_argument("--skip-fio", action="store_true")
    ap.add_argument("--small-mib", type=int, default=130)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--moto-spill", action="store_true",
                    help="moto's default: objects over 5 MiB in temporary files on this "
                         "machine's disk (lsbd's segments, not s3backer's blocks); the "
                         "runs before 2026-12-04 were made so")
    ap.add_argument("--subjects", default="lsbd,s3backer",
                    help="which to run (comma-separated; the report needs s3backer); "
                         "lsbd+OPT mounts lsbd with --OPT as well (e.g. lsbd+direct-io, "
                         "lsbd+readahead=4M); "
                         "lsbd@DIR runs the lsbd of the checkout DIR (its .venv)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("distant_bench needs root (FUSE, loop devices)", file=sys.stderr)
        return 1
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    src = tempfile.mkdtemp(prefix="distant-src-", dir=args.workdir)
    try:
        written = make_tree(src, args.small_mib, args.big_mib)
        # The tree on disk now, or the first copy's sync would write it back
        # as well, timed as that subject's.
        os.sync()
        print(f"tree: {written / MiB:.0f} MiB", flush=True)
        results, lines = {}, []
        for delay in (float(d) for d in args.delays.split(",")):
            results[delay] = run_delay(delay, src, written, args)
            for name in results[delay]:
                if name.startswith("lsbd") and "s3backer" in results[delay]:
                    lines += report(delay, results[delay], name)
        print("\n".join(lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({str(k): v for k, v in results.items()}, f, indent=1)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return 0


if __name__ == "__main__":
    threading.stack_size(1 << 20)
    sys.exit(main())
