#!/usr/bin/env python3
"""What compression and encryption cost a served volume, and what they save.

    .venv/bin/python bench/crypto_nbd_bench.py [--runtime 8] [--size 512M] [--tree DIR ...]
        [--rounds 3] [--subjects plain,zstd,zstd+aes] [--jobs randwrite,randread,write,read]
        [--skip-nbd] [--skip-ext4]

1. fio through NBD (the jobs of bench/nbd_bench.py: iodepth 16, Unix socket)
   against `lsbd serve` of three volumes served at once: plain (--compress
   none), compressed (the default), and compressed and encrypted; each job
   runs on one after the other (in the orders of a Williams design),
   --rounds times, so that a shared machine's drifting load falls on all
   alike; the median ratio to plain (#13 asks at most 15% slower on random
   I/O), each round's ratio, and the load average after each run.  After
   each write job the server is asked to flush to the store (its control
   socket) and the time that takes is shown apart ("catch-up"): on a
   file:// store a plain volume's uploads are hard links, while a sealed
   one compresses, encrypts and writes every segment again, and the next
   job must not be charged for that; then a checkpoint is written, also
   untimed, so that every write round starts from the same state and none
   carries a checkpoint (one every 64 segments, 0.3-1.7 s of CPU, else
   landing in one subject's 5 s round and not the other's).  Before the
   random write rounds each subject takes WARMUP_REGIONS regions of untimed
   random writes (WARMUP_REGIONS says why).  The volumes keep no history
   (--retain 0) and are compacted after the warm-up and after each write
   round, untimed (COMPACT_THRESHOLD says why); the run refuses to start
   without the free space it may need (space_needed).  Every server gets --cache-limit 8G
   (CACHE_LIMIT says why).  Also: the CPU time the server and its sealing
   process spend per request (per MiB for 1 MiB jobs), the catch-up
   and checkpoint included, by round and its median, a figure the load of
   a shared machine sways less than the rates; the CPU of the timed part
   alone split by process (the server, its sealing process, the map's
   process, fio, everything else on the machine such as kernel threads,
   and the cores' idle time), per request; the server's anonymous RSS
   (its peak, with its sealing process's, from /proc); and the bytes each
   store holds.
2. An ext4 image holding real files (default /usr/share/doc, /usr/share/man
   and this virtualenv's packages, via mkfs.ext4 -d) plus as much random
   data, imported into a plain and into a compressed, encrypted volume: the
   bytes uploaded and the compression ratio.

A subject may be given as NAME@DIR (for example zstd+aes@/path/to/checkout):
the volume NAME's options, served by the lsbd checked out in DIR, to compare
two versions of the code in one run.  A subject given twice is served twice
(the second as NAME.2): a twin, the control of the method.

How the ratios are judged (docs/security.md, "How the benchmark measures"):
every pair of subjects with the same options, and every subject against
plain, gets the median of the rounds' paired ratios (the two ran in the
same round, next to each other) with a 95% interval from the order
statistics (the sign test's), and the rounds' range.  A twin's ratio to
its twin says how far the method itself is off in that run: a ratio to
plain means something only where the twin's interval is narrow and holds
1.  Every server starts alike (PYTHONHASHSEED=0, no address-space
randomisation; --random-layout to not); fio runs on core 0 and each
serving process on core 1, its helper processes on any (--no-pin to not);
before each read round the subject's region is read once, untimed, so
that no timed read goes to the disk ("disk B": bytes read from storage
per request, which should stay near 0).

Not a test: figures are noisy, compare within one run.  Needs fio and
e2fsprogs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import code_path, drop_page_cache, fio, parse_size, sh, stop, wait_for

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lsbd import names
from lsbd.engine import control

PASSPHRASE = "bench passphrase"
SUBJECTS = [("plain", ["--compress", "none"]), ("zstd", []),
            ("zstd+aes", ["--encrypt"])]
OPTIONS = dict(SUBJECTS)
#: Subjects served by the lsbd checked out in another folder (NAME@DIR).
CODE: dict[str, str] = {}
#: Helper processes of a server, by the module they run.
HELPERS = {"lsbd.crypto.worker": "sealer", "lsbd.map.offload_child": "map"}
SPLIT = ("server", "sealer", "map", "fio", "rest", "idle", "disk B")
JOBS = [("rand write 4k", "randwrite", "4k"), ("rand read 4k", "randread", "4k"),
        ("seq write 1M", "write", "1M"), ("seq read 1M", "read", "1M")]
#: Every subject's segment cache holds the whole working set: on a file://
#: store a plain volume's local segments are the store's own files (hard
#: links), never evicted, while a sealed volume's are a cache like any other;
#: with the default 1 GiB its random reads went partly to the store, which
#: measured the cache's size, not what compression and encryption cost.
CACHE_LIMIT = "8G"
#: Untimed random writes per subject before the timed rounds, in multiples of
#: the region.  A random write's journal goes into a new page-cache page; a
#: segment's pages are let go (lsbd.segments.copies.drop_page_cache) only
#: once all its blocks are overwritten, about ln(blocks per segment) regions
#: of random writes later (4.5 GiB for 512 MiB), so until then each volume's
#: cache grows into free memory.  On a virtual machine that hands free
#: memory back to its host (free page reporting), a page taken from there
#: costs a fault in the host when first written: perf put 28% of a plain
#: server's samples in the kernel's copy into the page cache in such rounds
#: (2% in others), 12-18 us of system time per write against 6-8, falling
#: on whichever subject ran then.  After the warm-up every round reuses the
#: pages its own volume lets go, as a volume in use for a while does.
WARMUP_REGIONS = 10
#: Every volume is created with no retention window (--retain 0) and
#: compacted after the warm-up and after each write round, untimed: random
#: writes over the region leave each round's segments mostly dead, and kept
#: (the default keeps 24 hours), four subjects' stores and caches filled the
#: disk's 74 GB in the 7th-8th round of 5 s.  The product's default threshold.
COMPACT_THRESHOLD = 0.6
#: The most #13 allows a compressed, encrypted volume to lose on random I/O.
RANDOM_LIMIT = 0.85
#: With --pin (the default): the core fio runs on, and the core of each
#: serving process (its threads: the connection's, the sealer thread, the
#: pool); its helper processes (sealing, map) may run on either, as
#: unpinned.  See "How the benchmark measures" in docs/security.md.
FIO_CPU = "0"
SERVER_CPU = 1
PIN = True
#: Every server starts alike: the same hash seed, and (unless
#: --random-layout) no address-space randomisation, so that two servers of
#: one code lay out their memory the same way.
SAME_LAYOUT = True


def orders(n: int) -> list[list[int]]:
    """The orders the rounds run n subjects in, one after the other (a
    Williams design): each subject runs in each place, and after each other
    subject, equally often over len(orders(n)) rounds.  Reversing every
    other round (as before) left two of four subjects running twice in a
    row at each turn of round, and twins differed by place: 1.036 and 1.070
    with intervals above 1 (docs/security.md)."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95% (at least) confidence interval for the median of `values`,
    from their order statistics alone (the sign test's: no assumption on
    how the rounds' ratios are distributed, only that they are independent)."""
    xs = sorted(values)
    n = len(xs)
    k = 0          # the interval is xs[k], xs[n - 1 - k]
    while k + 1 < n - 1 - k and sum(math.comb(n, i) for i in range(k + 2)) / 2 ** n <= 0.025:
        k += 1
    return xs[k], xs[n - 1 - k]


def paired(a: list[float], b: list[float]) -> str:
    """The median of the rounds' ratios a/b, its 95% interval and their range."""
    ratios = [x / y for x, y in zip(a, b)]
    lo, hi = median_interval(ratios)
    return (f"{statistics.median(ratios):.3f} (95% {lo:.3f}-{hi:.3f}; "
            f"rounds {min(ratios):.2f}-{max(ratios):.2f})")


def folder(name: str) -> str:
    return name.replace("/", "_")


def base(workdir: str, name: str) -> list[str]:
    return [sys.executable, "-m", "lsbd.cli.main", "--store",
            f"file://{os.path.join(workdir, folder(name), 'store')}", "--cache-dir",
            os.path.join(workdir, folder(name), "cache")]


def env(name: str = "") -> dict:
    extra = {"PYTHONPATH": code_path(CODE[name])} if name in CODE else {}
    if SAME_LAYOUT:
        extra["PYTHONHASHSEED"] = "0"
    return {**os.environ, "LSBD_PASSPHRASE": PASSPHRASE, **extra}


def launcher() -> list[str]:
    """What a server is started under: pinned to SERVER_CPU (--pin), without
    address-space randomisation (SAME_LAYOUT)."""
    pre = ["taskset", "-c", str(SERVER_CPU)] if PIN else []
    if SAME_LAYOUT:
        pre += ["setarch", platform.machine(), "-R"]
    return pre


def cwd(name: str = "") -> str | None:
    """Where a subject's processes run: `python -m` puts its working
    directory first on sys.path, before PYTHONPATH, so a NAME@DIR subject
    run from a checkout of lsbd would import that checkout, not DIR's."""
    return CODE.get(name)


def system_cpu() -> tuple[float, float]:
    """Seconds the machine's cores have been busy and idle (iowait counts
    as idle), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, idle / tick


def disk_read(pid: int) -> int:
    """Bytes process `pid` has had read from storage so far (/proc/PID/io)."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) of process `pid` so far; 0 if gone."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def free_bytes(path: str) -> int:
    """Bytes free to an unprivileged writer on the file system of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def space_needed(size: int, runtime: int, subjects: int) -> int:
    """Bytes of free disk a run of the NBD table needs at its peak, with
    room to spare: each compacted volume holds up to 4 times its region
    (the live data, segments above the threshold, and an encrypted one's
    cache besides its store; 1-2 GiB a subject for 512 MiB measured), and
    one subject at a time holds all of its warm-up, or of one round's
    writes (at most 100k 4 KiB writes a second here), twice (an encrypted
    volume's cache and store) until it is compacted."""
    burst = max(WARMUP_REGIONS * size, runtime * 100_000 * 4096)
    return subjects * 4 * size + 2 * burst


def stored_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


class Server:
    def __init__(self, workdir: str, name: str, proc: subprocess.Popen, uri: str):
        self.proc = proc
        self.uri = uri
        store = SimpleNamespace(url=f"file://{os.path.join(workdir, folder(name), 'store')}")
        cache = names.cache_dir_for(os.path.join(workdir, folder(name), "cache"), store, "bench")
        self.control = control.socket_path(cache)
        self.peak_anon = 0

    def _timed(self, op: str) -> float:
        """Seconds the server's control socket takes to do `op`."""
        start = time.monotonic()
        reply = control.call(self.control, {"op": op}, timeout=600)
        if not reply or not reply.get("ok"):
            raise RuntimeError(f"{op} failed: {reply}")
        return time.monotonic() - start

    def flush(self) -> float:
        """Seconds until everything written is in the store."""
        return self._timed("flush")

    def checkpoint(self) -> float:
        """Seconds to write a checkpoint of the map (none if one is current)."""
        return self._timed("checkpoint")

    def compact(self) -> float:
        """Seconds to compact the volume (it has no retention window, so
        this deletes what it overwrote): what keeps a long run's stores from
        filling the disk.  It returns when done, so it never runs in a timed
        round (a served volume compacts only when asked, never unasked)."""
        start = time.monotonic()
        reply = control.call(self.control, {"op": "compact", "threshold": COMPACT_THRESHOLD},
                             timeout=3600)
        if not reply or not reply.get("ok"):
            raise RuntimeError(f"compact failed: {reply}")
        return time.monotonic() - start

    def cpu_seconds(self) -> float:
        """CPU time so far (user and system) of the server and its children
        living now (the sealing process, the map's process)."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[str, float]:
        """cpu_seconds split into the server's own and each helper's."""
        split = {"server": process_cpu(self.proc.pid), "sealer": 0.0, "map": 0.0}
        for pid in self._family()[1:]:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
                module = argv[argv.index(b"-m") + 1].decode() if b"-m" in argv else ""
                role = HELPERS.get(module, "server")
                split[role] = split.get(role, 0.0) + process_cpu(pid)
        return split

    def disk_read(self) -> int:
        """Bytes the server and its children have read from storage so far:
        a random read that misses the page cache (memory the kernel paged
        out between two rounds) reads from the disk."""
        return sum(disk_read(pid) for pid in self._family())

    def unpin_helpers(self) -> None:
        """Let the helper processes run on every core: they inherited the
        server's pinning when it started them."""
        if not PIN:
            return
        for pid in self._family()[1:]:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, range(os.cpu_count() or 1))

    def _family(self) -> list[int]:
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split()]
        return pids

    def sample_rss(self) -> None:
        """The server's anonymous RSS, with its children's (the sealing process)."""
        total = 0
        for pid in self._family():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
        self.peak_anon = max(self.peak_anon, total)


@contextlib.contextmanager
def serve(workdir: str, name: str, options: list[str], size: int):
    cmd = base(workdir, name)
    # No retention window: what a round overwrites, compaction may delete.
    sh(*cmd, "create", "bench", "--size", str(size), "--retain", "0", *options,
       env=env(name), cwd=cwd(name))
    sock = os.path.join(workdir, folder(name), "lsbd.sock")
    proc = subprocess.Popen([*launcher(), *cmd, "serve", "bench", "--socket", sock,
                             "--cache-limit", CACHE_LIMIT], env=env(name), cwd=cwd(name),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock, proc)
        yield Server(workdir, name, proc, f"nbd+unix:///bench?socket={sock}")
    finally:
        stop(proc)


def sampling(server: Server, every: float = 0.5):
    """A thread sampling the server's RSS until the returned event is set."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(every):
            with contextlib.suppress(OSError):
                server.sample_rss()

    threading.Thread(target=run, daemon=True).start()
    return done


def nbd_table(workdir: str, size: str, runtime: int, rounds: int) -> bool:
    """Every subject served at once; each job runs on one subject after the
    other (in the orders of a Williams design, orders()), `rounds` times, so that
    the machine's load, which drifts on a shared machine, falls on all of
    them alike.  A job's figure is its mean over the rounds; the ratio to
    plain is the median of the rounds' ratios.  If a round fails, the summary has the
    rounds before it, and the result is False."""
    results: dict[str, dict] = {name: {} for name, _ in SUBJECTS}
    loads: list[float] = []     # the 1-minute load average after each run
    drop_page_cache()
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, options in SUBJECTS:
            server = servers[name] = stack.enter_context(
                serve(workdir, name, options, parse_size(size)))
            stack.callback(sampling(server).set)
            fio(server.uri, "write", "1M", size=size, runtime=None,     # the untimed fill
                cpus=FIO_CPU if PIN else None)
            print(f"  {name}: fill, then {server.flush():.1f}s to catch up", flush=True)
            server.unpin_helpers()
        if any(rw == "randwrite" for _j, rw, _b in JOBS):
            for name, server in servers.items():
                start = time.monotonic()
                fio(server.uri, "randwrite", "4k", size=size, runtime=None,
                    io_size=WARMUP_REGIONS * parse_size(size), cpus=FIO_CPU if PIN else None)
                server.flush()
                server.checkpoint()
                took = time.monotonic() - start
                print(f"  {name}: warm-up, {WARMUP_REGIONS} x {size} of random writes in "
                      f"{took:.0f}s, then {server.compact():.0f}s to compact "
                      f"({free_bytes(workdir) / 2**30:.0f} GiB free)", flush=True)

        def run_round(job, rw, bs, key, order):
            # Each place in turn, after each other subject in turn: a
            # load that rises (or falls) through a round, or what the
            # subject before leaves behind, then favours none.
            for name, _ in (SUBJECTS[k] for k in order):
                servers[name].unpin_helpers()
                if "read" in rw:
                    # The region read once, untimed, before each read
                    # round: the kernel of the machine this was written
                    # on pages out page-cache memory it sees untouched
                    # for about a minute (DAMON), and a random read over
                    # 512 MiB touches each page too rarely for it to
                    # see, so reads went to the disk, through the pool,
                    # 30-110 bytes a request, unevenly between subjects
                    # ("disk B"; docs/security.md).
                    fio(servers[name].uri, "read", "1M", size=size, runtime=None,
                        cpus=FIO_CPU if PIN else None)
                cpu = servers[name].cpu_seconds()
                disk = servers[name].disk_read()
                before, machine = servers[name].cpu_by_process(), system_cpu()
                r = fio(servers[name].uri, rw, bs, size=size, runtime=runtime,
                        cpus=FIO_CPU if PIN else None)
                after, machine_after = servers[name].cpu_by_process(), system_cpu()
                disk = servers[name].disk_read() - disk
                split = {k: after[k] - before.get(k, 0.0) for k in after}
                split["fio"] = r["cpu_s"]
                split["rest"] = (machine_after[0] - machine[0]) - sum(split.values())
                split["idle"] = machine_after[1] - machine[1]
                requests = r["iops"] * r["seconds"]
                results[name][job]["split"].append(
                    {**{k: split.get(k, 0.0) / requests * 1e6 for k in SPLIT},
                     "disk B": disk / requests})
                catch_up = servers[name].flush() if "write" in rw else 0.0
                if "write" in rw:
                    # Untimed, like the catch-up: every round starts from a
                    # fresh checkpoint, so none falls inside a timed round.
                    results[name][job]["checkpoint"] += servers[name].checkpoint()
                cpu = servers[name].cpu_seconds() - cpu
                results[name][job]["cpu"].append(cpu / (r["iops"] * r["seconds"]) * 1e6)
                compacted = servers[name].compact() if "write" in rw else 0.0
                # Untimed and outside the CPU figure: what the round
                # overwrote leaves the disk before the next one.
                results[name][job]["compact"] += compacted
                results[name][job]["runs"].append(r[key])
                results[name][job]["catch_up"] += catch_up
                load = os.getloadavg()[0]
                loads.append(load)
                print(f"    {job:14} {name:9} {r['mib_s']:9.1f} MiB/s {r['iops']:10.0f} IOPS"
                      f"   load {load:4.1f}"
                      + (f"   then {catch_up:.1f}s to catch up, {compacted:.1f}s to compact, "
                         f"{free_bytes(workdir) / 2**30:.0f} GiB free" if "write" in rw else ""),
                      flush=True)

        failed = False
        del_jobs: list[str] = []
        for job, rw, bs in JOBS:
            key = "iops" if bs == "4k" else "mib_s"
            for name, _ in SUBJECTS:
                results[name][job] = {"runs": [], "cpu": [], "catch_up": 0.0,
                                      "checkpoint": 0.0, "compact": 0.0, "split": []}
            sequence = orders(len(SUBJECTS))
            for i in range(rounds):
                if failed:
                    break
                kept = {n: {k: (list(v) if isinstance(v, list) else v)
                            for k, v in results[n][job].items()} for n, _ in SUBJECTS}
                try:
                    run_round(job, rw, bs, key, sequence[i % len(sequence)])
                except (RuntimeError, subprocess.CalledProcessError) as e:
                    # One failed fio call used to end the whole run with no
                    # summary: report the rounds every subject completed.
                    detail = (e.stderr or "").strip()[-2000:] if isinstance(
                        e, subprocess.CalledProcessError) else ""
                    print(f"    {job}: round {i + 1} failed, the summary has the rounds "
                          f"before it: {e}\n{detail}", flush=True)
                    for n, _ in SUBJECTS:
                        results[n][job] = kept[n]
                    failed = True
            if not results["plain"][job]["runs"]:
                del_jobs.append(job)
                continue
            for name, _ in SUBJECTS:
                runs = results[name][job]["runs"]
                results[name][job]["mean"] = sum(runs) / len(runs)
        for name, server in servers.items():
            server.sample_rss()
            results[name]["rss"] = server.peak_anon
    for name, _ in SUBJECTS:
        results[name]["stored"] = stored_bytes(os.path.join(workdir, folder(name), "store"))
    print(f"\n  load average {min(loads):.1f}-{max(loads):.1f}, median {statistics.median(loads):.1f}")
    cut = ", fewer from the failed one on" if failed else ""
    print(f"  job ({rounds} rounds{cut})  " + "".join(f"{n:>12}" for n, _ in SUBJECTS)
          + "   (mean IOPS or MiB/s; median ratio to plain; catch-up after writes in s)")
    for job, _rw, bs in JOBS:
        if job in del_jobs:
            continue
        unit = "IOPS" if bs == "4k" else "MiB/s"
        plain = results["plain"][job]["runs"]
        line = f"  {job:14} " + "".join(f"{results[n][job]['mean']:12.0f}" for n, _ in SUBJECTS)
        line += f" {unit:5} ratio " + " ".join(
            f"{statistics.median(a / b for a, b in zip(results[n][job]['runs'], plain)):.2f}"
            for n, _ in SUBJECTS[1:])
        if "write" in job:
            line += "   catch-up " + " / ".join(f"{results[n][job]['catch_up']:.1f}"
                                               for n, _ in SUBJECTS)
            line += ", checkpoints " + " / ".join(f"{results[n][job]['checkpoint']:.1f}"
                                                  for n, _ in SUBJECTS)
            line += ", compactions " + " / ".join(f"{results[n][job]['compact']:.1f}"
                                                  for n, _ in SUBJECTS)
        if bs == "4k":
            ratios = [statistics.median(a / b for a, b in zip(results[n][job]["runs"], plain))
                      for n, _ in SUBJECTS[1:]]
            line += "   " + " ".join("pass" if r >= RANDOM_LIMIT else "FAIL" for r in ratios)
            line += f" (>= {RANDOM_LIMIT})"
        print(line)
        for n, _ in SUBJECTS[1:]:
            print(f"  {'':14} {n} / plain by round: " + ", ".join(
                f"{a / b:.2f}" for a, b in zip(results[n][job]["runs"], plain)))
        # Every pair of subjects with the same volume options: a twin
        # (the same code twice) says how far the method itself is off; two
        # versions of the code, what the change does.
        for i, (n, opts) in enumerate(SUBJECTS):
            for m, other in SUBJECTS[i + 1:]:
                if other == opts:
                    print(f"  {'':14} {m} / {n}: " + paired(results[m][job]["runs"],
                                                            results[n][job]["runs"]))
        for n, opts in SUBJECTS[1:]:
            if opts != SUBJECTS[0][1]:
                print(f"  {'':14} {n} / plain: " + paired(results[n][job]["runs"], plain))
        print(f"  {'':14} server CPU per {'request' if bs == '4k' else 'MiB'} by round (us): "
              + "; ".join(f"{n} " + " ".join(f"{c:.1f}" for c in results[n][job]["cpu"])
                          for n, _ in SUBJECTS))
        cpus = {n: statistics.median(results[n][job]["cpu"]) for n, _ in SUBJECTS}
        unit = "request" if bs == "4k" else "MiB"
        print(f"  {'':14} server CPU per {unit} (with sealing, median): "
              + ", ".join(f"{n} {cpus[n]:.1f} us" for n, _ in SUBJECTS)
              + "; plain / " + " / ".join(f"{cpus['plain'] / cpus[n]:.2f}" for n, _ in SUBJECTS[1:]))
        print(f"  {'':14} timed part's CPU per {unit} by process (median, us): " + "; ".join(
            f"{n} " + " ".join(
                f"{k} {statistics.median(s[k] for s in results[n][job]['split']):.1f}"
                for k in SPLIT) for n, _ in SUBJECTS))
    print("  anon RSS MiB   " + "".join(f"{results[n]['rss'] / 2**20:12.0f}"
                                        for n, _ in SUBJECTS))
    print("  stored MiB     " + "".join(f"{results[n]['stored'] / 2**20:12.0f}"
                                        for n, _ in SUBJECTS))
    return not failed


def ext4_table(workdir: str, trees: list[str]) -> None:
    staging = os.path.join(workdir, "tree")
    os.makedirs(staging)
    for tree in trees:
        subprocess.run(["cp", "-a", tree, os.path.join(staging, os.path.basename(tree))],
                       check=False, stderr=subprocess.DEVNULL)
    files = stored_bytes(staging)
    with open(os.path.join(staging, "random.bin"), "wb") as f:
        for _ in range(-(-files // (8 << 20))):
            f.write(os.urandom(8 << 20))
    image = os.path.join(workdir, "ext4.img")
    size = (2 * files + (256 << 20)) // (1 << 20) * (1 << 20)
    sh("mkfs.ext4", "-q", "-F", "-d", staging, image, f"{size // 1024}k")
    shutil.rmtree(staging)
    print(f"\n  ext4 image of {size >> 20} MiB: {files >> 20} MiB of files, as much random")
    for name, options in (("plain", ["--compress", "none"]), ("zstd+aes", ["--encrypt"])):
        cmd = base(workdir, f"ext4-{name}")
        sh(*cmd, "create", "img", "--size", str(size), *options, env=env())
        sh(*cmd, "import", "img", image, env=env())
        stored = stored_bytes(os.path.join(workdir, f"ext4-{name}", "store"))
        print(f"    {name:9} uploaded {stored / 2**20:8.1f} MiB")
    plain = stored_bytes(os.path.join(workdir, "ext4-plain", "store"))
    sealed = stored_bytes(os.path.join(workdir, "ext4-zstd+aes", "store"))
    print(f"    compression ratio (plain / compressed and encrypted): {plain / sealed:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", default="512M", help="region fio works on (default 512M)")
    ap.add_argument("--tree", action="append", help="directories to put in the ext4 image")
    ap.add_argument("--rounds", type=int, default=4,
                    help="times each job runs on each subject, interleaved (default 4); "
                    "a multiple of the subjects' number (twice it if odd) balances the "
                    "order")
    ap.add_argument("--skip-nbd", action="store_true")
    ap.add_argument("--subjects", default=",".join(n for n, _ in SUBJECTS),
                    help="which of plain,zstd,zstd+aes (plain is always run), each "
                    "as NAME or NAME@DIR (served by the lsbd checked out in DIR)")
    ap.add_argument("--skip-ext4", action="store_true")
    ap.add_argument("--jobs", default=",".join(rw for _j, rw, _b in JOBS),
                    help="which fio jobs of randwrite,randread,write,read (default all)")
    ap.add_argument("--no-pin", action="store_true",
                    help=f"run fio and the servers on any core (default: fio on core "
                    f"{FIO_CPU}, each serving process on core {SERVER_CPU}, its helper "
                    "processes on any)")
    ap.add_argument("--random-layout", action="store_true",
                    help="start each server with a random hash seed and address-space "
                    "layout (default: the same for all)")
    args = ap.parse_args()
    global PIN, SAME_LAYOUT
    PIN, SAME_LAYOUT = not args.no_pin, not args.random_layout
    trees = args.tree or ["/usr/share/doc", "/usr/share/man",
                          os.path.join(sys.prefix, "lib")]
    workdir = tempfile.mkdtemp(prefix="lsbd-crypto-bench-", dir="/var/tmp")
    try:
        given = args.subjects.split(",")
        wanted = ["plain", *given[1:]] if given[0] == "plain" else ["plain", *given]
        taken: set[str] = set()
        for spec in wanted:
            name, _, code = spec.partition("@")
            if name not in OPTIONS:
                ap.error(f"unknown subject {name!r}: one of {', '.join(OPTIONS)}")
            if code:
                spec = f"{name}@{os.path.basename(os.path.abspath(code))}"
            # A subject given twice is served twice, as NAME.2: a twin.
            twin, nth = spec, 1
            while twin in taken:
                nth += 1
                twin = f"{spec}.{nth}"
            taken.add(twin)
            if code:
                CODE[twin] = os.path.abspath(code)
            SUBJECTS.append((twin, OPTIONS[name]))
        del SUBJECTS[:len(OPTIONS)]
        JOBS[:] = [j for j in JOBS if j[1] in args.jobs.split(",")]
        complete = True
        need, free = space_needed(parse_size(args.size), args.runtime, len(SUBJECTS)), \
            free_bytes(workdir)
        if not args.skip_nbd and free < need:
            print(f"crypto_nbd_bench: {free / 2**30:.1f} GiB free in {os.path.dirname(workdir)}, "
                  f"{len(SUBJECTS)} subjects of {args.size} need about {need / 2**30:.1f} GiB: "
                  "free some, or run fewer subjects or a smaller --size", file=sys.stderr)
            return 2
        if not args.skip_nbd:
            complete = nbd_table(workdir, args.size, args.runtime, args.rounds)
        if not args.skip_ext4:
            ext4_table(workdir, trees)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
