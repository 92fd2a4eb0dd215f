#!/usr/bin/env python3
"""Scale benchmark: a large sparse volume written at random, as databases
and VMs write real disks.

    .venv/bin/python bench/scale_bench.py [--volume-size 1T] [--writes 4G]
        [--round 1G] [--region 1G] [--runtime 10] [--fio-compress PCT]
        [--json FILE] [--keep] [--only-frag]
    .venv/bin/python bench/scale_bench.py --reopen WORKDIR   (steps 5-6 only,
        on the store of a run kept with --keep)

One `lsbd serve` of a volume of --volume-size in a file:// store, driven by
fio's nbd engine (libnbd) at iodepth 16 over a Unix socket:

  1. fill:    --region bytes at the start of the volume, sequential 1 MiB
              writes (the region the read jobs use);
  2. writes:  --writes bytes of random 4 KiB writes over the whole volume,
              in rounds of --round bytes: write IOPS per round, and after
              each round the map's extents, its LMDB file size and bytes
              per extent, and the server's anonymous and file-backed RSS;
  3. frag:    --region bytes of random 4 KiB writes inside the region, then
              sequential 1 MiB reads of it (what a log-structured store
              finds hardest: every 4 KiB piece lives somewhere else), twice,
              each pass reading the region once from a dropped page cache:
              the second pass shows what the first one's reads changed;
  4. checkpoint: one through the running server, timed; its bytes, and the
              bytes of every checkpoint written during the run;
  5. open:    the server stopped, its cache dir deleted, the page cache
              dropped: the time until a new server over the store alone
              serves its socket (from the newest checkpoint, which may be a
              base); then, apart, the map of the checkpoint with the longest
              chain (a base and the most deltas) loaded from the store;
  6. cold random reads of the region (4 KiB) from that fresh cache.

--only-frag runs the fill and the frag phase alone (a minute or two).

nbdkit's file plugin gets the same fill, frag writes and sequential reads
on a sparse file of the same size, for the ratio.  Peak RssAnon and RssFile
come from /proc/PID/status, sampled every 0.2 s, for the server and, apart,
its child processes (the sealing process of a compressed volume).
--fio-compress makes fio write buffers that compress by about PCT percent
(for both servers), so that a large run's store fits on the disk of a
compressed volume.  Not a test: figures are
noisy, compare within one run.  Needs fio and nbdkit; root to drop caches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import drop_page_cache, fio, nbdkit, parse_size, sh, stop, wait_for, work_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _rss(pid: int) -> tuple[int, int]:
    anon = file = 0
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    return anon, file


TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> tuple[float, float]:
    """User and system seconds of one process (0 if it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / TICK, int(fields[12]) / TICK
    return 0.0, 0.0


def _major_faults(pid: int) -> int:
    """Page faults of one process that had to read from disk (0 if it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[9])
    return 0


def _run_delay(pid: int) -> float:
    """Seconds the threads of one process spent runnable but waiting for a
    core (the second field of each thread's schedstat; 0 if it is gone)."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
    return total / 1e9


def _kswapd_pids() -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{name}/comm") as f:
                    if f.read().startswith("kswapd"):
                        pids.append(int(name))
    return pids


def _keyed(path: str) -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.replace(":", " ").split()
            if len(parts) >= 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
    return out


def system_sample(pid: int) -> dict:
    """What a round of writes costs outside the map's own counters: the
    server's CPU (user, system) and its threads' wait for a core, its child
    processes' CPU, kswapd's (the kernel reclaiming pages), the machine's
    busy and stolen time, free memory and the page cache, pages the kernel
    scanned to reclaim, and the page faults of the server and its child
    processes that read from disk."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    mem = _keyed("/proc/meminfo")
    vm = _keyed("/proc/vmstat")
    kids = [_proc_cpu(c) for c in _children(pid)]
    return {"server": _proc_cpu(pid), "children": sum(u + s for u, s in kids),
            "server_wait": _run_delay(pid),
            "server_majflt": _major_faults(pid),
            "children_majflt": sum(_major_faults(c) for c in _children(pid)),
            "kswapd": sum(sum(_proc_cpu(k)) for k in _kswapd_pids()),
            "total": sum(cpu) / TICK, "idle": (cpu[3] + cpu[4]) / TICK,
            "steal": cpu[7] / TICK if len(cpu) > 7 else 0.0,
            "mem_free_kib": mem.get("MemFree", 0), "cached_kib": mem.get("Cached", 0),
            "dirty_kib": mem.get("Dirty", 0),
            "scanned": vm.get("pgscan_kswapd", 0) + vm.get("pgscan_direct", 0),
            "direct": vm.get("pgscan_direct", 0)}


def system_round(before: dict, after: dict, writes: int) -> dict:
    """Per round: µs of CPU per write (server user and system, its children,
    kswapd) and of the server's wait for a core, the machine's busy and
    stolen share, memory at the end, pages scanned for reclaim per write,
    disk-reading page faults per 1,000 writes."""
    per = 1e6 / max(1, writes)
    total = max(1e-9, after["total"] - before["total"])
    return {"server_user_us": per * (after["server"][0] - before["server"][0]),
            "server_sys_us": per * (after["server"][1] - before["server"][1]),
            "children_us": per * (after["children"] - before["children"]),
            "server_wait_us": per * (after["server_wait"] - before["server_wait"]),
            "server_majflt_per_kwrite": 1e3 / max(1, writes) * (after["server_majflt"]
                                                                 - before["server_majflt"]),
            "children_majflt_per_kwrite": 1e3 / max(1, writes) * (after["children_majflt"]
                                                                   - before["children_majflt"]),
            "kswapd_us": per * (after["kswapd"] - before["kswapd"]),
            "busy": 1 - (after["idle"] - before["idle"]) / total,
            "steal": (after["steal"] - before["steal"]) / total,
            "mem_free_kib": after["mem_free_kib"], "cached_kib": after["cached_kib"],
            "dirty_kib": after["dirty_kib"],
            "scanned_per_write": (after["scanned"] - before["scanned"]) / max(1, writes),
            "direct_scanned": after["direct"] - before["direct"]}


class RssSampler:
    """Peak RssAnon / RssFile (KiB) of one process, and the peak RssAnon of
    its child processes together, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid = pid
        self.peak_anon = self.peak_file = self.peak_children_anon = 0
        self._phase_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def now(self) -> tuple[int, int]:
        return _rss(self.pid)

    def phase(self) -> int:
        """The peak RssAnon (KiB) since the last call: of one phase."""
        peak, self._phase_peak = self._phase_peak, 0
        return max(peak, self.now()[0])

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            anon, file = self.now()
            self._phase_peak = max(self._phase_peak, anon)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, file)
            kids = sum(_rss(c)[0] for c in _children(self.pid))
            self.peak_children_anon = max(self.peak_children_anon, kids)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class CheckpointSampler:
    """Every checkpoint object that appears in the store during the run, with
    its largest size seen (checkpoints older ones may be pruned meanwhile)."""

    def __init__(self, store_dir: str, volume: str, interval: float = 0.5):
        self.root = os.path.join(store_dir, "volumes", volume, "ckpt")
        self.seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def scan(self) -> None:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    size = os.path.getsize(path)
                    with self._lock:
                        self.seen[path] = max(size, self.seen.get(path, 0))

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.scan()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.seen.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.scan()


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


class Lsbd:
    """One `lsbd serve` of the bench volume; restartable with a new cache dir."""

    def __init__(self, workdir: str, volume_size: int, create_args: list[str], *,
                 create: bool = True, serve_args: list[str] | None = None):
        self.workdir = workdir
        self.serve_args = serve_args or []
        self.store_dir = os.path.join(workdir, "store")
        self.cache = os.path.join(workdir, "cache")
        self.sock = os.path.join(workdir, "lsbd.sock")
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(workdir, "lsbd.log"), "a")
        if create:
            sh(*self.base(), "create", "bench", "--size", str(volume_size), *create_args)

    def base(self) -> list[str]:
        return [sys.executable, "-m", "lsbd.cli.main", "--store", f"file://{self.store_dir}",
                "--cache-dir", self.cache]

    @property
    def uri(self) -> str:
        return f"nbd+unix:///bench?socket={self.sock}"

    def start(self) -> float:
        """Start serving; the seconds until the socket is there (the volume open)."""
        started = time.monotonic()
        self.proc = subprocess.Popen([*self.base(), "serve", "bench", "--socket", self.sock,
                                      *self.serve_args],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        wait_for(self.sock, self.proc, timeout=3600)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def stats(self) -> dict:
        return json.loads(sh(*self.base(), "stats", "bench", "--json").stdout)

    def checkpoint(self) -> None:
        """Through the running server, as `lsbd checkpoint` does with a writer."""
        code = ("import sys; from lsbd.engine import control; "
                "r = control.call(sys.argv[1], {'op': 'checkpoint'}, timeout=3600); "
                "sys.exit(0 if r else 1)")
        sh(sys.executable, "-c", code, self.control_path())

    def control_path(self) -> str:
        for dirpath, _dirs, files in os.walk(self.cache):
            for name in files:
                if name.endswith(".sock") or name == "control":
                    return os.path.join(dirpath, name)
        raise RuntimeError("no control socket in the cache dir")

    def map_file(self) -> int:
        """The block map's LMDB file (map/data.mdb; not a scratch map of a
        delta being built)."""
        for dirpath, _dirs, files in os.walk(self.cache):
            if os.path.basename(dirpath) == "map" and "data.mdb" in files:
                return os.path.getsize(os.path.join(dirpath, "data.mdb"))
        return 0

    def close(self) -> None:
        self.stop()
        self.log.close()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


#: lsbd's counters taken before and after each read pass (frag_and_read).
PASS_COUNTERS = ("read_defrag_bytes", "read_defrag_dropped_bytes", "segments_mapped",
                 "map_seconds")


def frag_and_read(uri: str, region: int, compress_pct: int = 0, stats=None) -> dict:
    """Random 4 KiB writes over the region (as many bytes as it holds), then
    sequential 1 MiB reads of it, timed: each pass reads the region exactly
    once (a pass timed by the clock would read it again and again once it
    is fast, and average the first read of the scattered blocks with what
    that read changed).  `stats` (lsbd's): each pass also reports what it
    relocated and dropped, and the sealer's segments and time in the map."""
    w = fio(uri, "randwrite", "4k", size=region, io_size=region, compress_pct=compress_pct)
    out = {"frag_write": w}
    # Again: what the first reads changed (lsbd lays scattered ranges out
    # again in the background, see lsbd/engine/readdefrag.py).
    for name in ("seq_read", "seq_read_again"):
        drop_page_cache()
        before = stats() if stats else {}
        out[name] = fio(uri, "read", "1M", size=region, io_size=region)
        if stats:
            after = stats()
            out[name].update({k: round(after.get(k, 0) - before.get(k, 0), 2)
                              for k in PASS_COUNTERS})
    return out


def reopen(lsbd: Lsbd, region: int, runtime: int, out: dict) -> None:
    """Steps 5 and 6: the cache dir deleted, the page cache dropped, the
    time until a new server over the store alone serves; cold random reads."""
    shutil.rmtree(lsbd.cache, ignore_errors=True)
    drop_page_cache()
    out["open_seconds"] = lsbd.start()
    rss = RssSampler(lsbd.proc.pid)
    try:
        print(f"  open from the store alone: {out['open_seconds']:.1f} s (load average "
              f"{os.getloadavg()[0]:.1f})", flush=True)
        drop_page_cache()
        cold = fio(lsbd.uri, "randread", "4k", size=region, runtime=runtime)
        out["cold_randread"] = cold
        print(f"  cold random reads 4k: {cold['iops']:.0f} IOPS", flush=True)
        st = lsbd.stats()
        out["reopen_extents"] = st["extents"]
        print(f"  {st['extents']} extents", flush=True)
    finally:
        rss.close()
    out["reopen_rss_peak_anon_kib"] = rss.peak_anon
    lsbd.stop()


def chain_open(store_dir: str) -> dict:
    """The checkpoint whose chain is longest (a base and the most deltas,
    the slowest to open), its map loaded from the store alone in a process
    of its own (bench/open_bench.py: the load only, no segments replayed)."""
    code = ("import json, sys; from lsbd.store.open import open_store; "
            "from lsbd.segments import checkpoints as c; s = open_store(sys.argv[1]); "
            "ms = [c.read_manifest(s, 'bench', q) for q in c.list_checkpoints(s, 'bench')]; "
            "print(json.dumps([[m.seq, m.chain, m.extents, m.delta_entries, m.base or 0] "
            "for m in ms]))")
    listed = json.loads(sh(sys.executable, "-c", code, f"file://{store_dir}").stdout)
    seq, chain, _ext, deltas, base = max(listed, key=lambda m: (m[1], m[3]))
    base_extents = next((m[2] for m in listed if m[0] == (base or seq)), 0)
    drop_page_cache()
    r = sh(sys.executable, os.path.join(REPO, "bench", "open_bench.py"), "--store", store_dir,
           "--volume", "bench", "--seq", str(seq), "--rounds", "1", "--keep",
           os.path.join(os.path.dirname(store_dir), "open-bench"))
    line = [x for x in r.stdout.splitlines() if x.startswith("open:")][-1]
    out = {"seq": seq, "chain": chain, "base_extents": base_extents, "delta_entries": deltas,
           "seconds": float(line.split()[1]), "cpu_seconds": float(line.split("(")[1].split()[0]),
           "loadavg": os.getloadavg()[0]}
    print(f"  loading the longest chain (a base of {base_extents} extents and {chain} deltas "
          f"of {deltas} entries): {out['seconds']:.1f} s ({out['cpu_seconds']:.1f} s of CPU), "
          f"load average {out['loadavg']:.1f}", flush=True)
    return out


def run_reopen(args) -> int:
    """--reopen: steps 5 and 6 again on a kept run's store."""
    lsbd = Lsbd(args.reopen, 0, [], create=False)
    out: dict = {}
    try:
        reopen(lsbd, parse_size(args.region), args.runtime, out)
        out["chain_open"] = chain_open(lsbd.store_dir)
    finally:
        lsbd.close()
    print(json.dumps(out))
    return 0


def run(args) -> dict:
    volume_size = parse_size(args.volume_size)
    writes = parse_size(args.writes)
    round_size = min(parse_size(args.round), writes)
    region = parse_size(args.region)
    out: dict = {"volume_size": volume_size, "writes": writes, "round": round_size,
                 "create": args.create, "fio_compress": args.fio_compress,
                 "region": region, "loadavg_start": os.getloadavg()}
    workdir = work_dir("lsbd-scale-bench-", args.workdir)
    print(f"volume {human(volume_size)} (lsbd create {args.create or 'defaults'}), "
          f"{human(writes)} of random 4 KiB writes in rounds of "
          f"{human(round_size)}, region {human(region)}"
          f"{f', fio buffers {args.fio_compress}% compressible' if args.fio_compress else ''}"
          f"; work dir {workdir}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    lsbd = Lsbd(workdir, volume_size, args.create.split())
    try:
        drop_page_cache()
        lsbd.start()
        rss = RssSampler(lsbd.proc.pid)
        ckpts = CheckpointSampler(lsbd.store_dir, "bench")
        try:
            fill = fio(lsbd.uri, "write", "1M", size=region, compress_pct=args.fio_compress)
            print(f"  fill {human(region)}: {fill['mib_s']:.0f} MiB/s", flush=True)
            rounds = []
            written = 0
            # The sealer's map commits in the round: ms per segment (wall,
            # its thread's CPU) and the share of the round it was busy (near
            # 100%: writers wait for the map).
            sealer = lsbd.stats()
            print(f"  {'written':>10} {'IOPS':>8} {'extents':>10} {'map file':>10} "
                  f"{'B/extent':>8} {'anon':>9} {'file':>9} {'load':>5} "
                  f"{'map ms/seg':>10} {'cpu':>5} {'busy':>5}", flush=True)
            while written < writes:
                n = min(round_size, writes - written)
                sys_before = system_sample(lsbd.proc.pid)
                r = fio(lsbd.uri, "randwrite", "4k", size=volume_size, io_size=n,
                        compress_pct=args.fio_compress)
                written += n
                sysr = system_round(sys_before, system_sample(lsbd.proc.pid), n // 4096)
                st = lsbd.stats()
                anon, file = rss.now()
                mapf = lsbd.map_file()
                row = {"written": written, "iops": r["iops"], "extents": st["extents"],
                       "map_file": mapf, "bytes_per_extent": mapf / max(1, st["extents"]),
                       "rss_anon_kib": anon, "rss_file_kib": file, "map": st.get("map"),
                       "seconds": r["seconds"], "loadavg": os.getloadavg()}
                mapped = max(1, st.get("segments_mapped", 0) - sealer.get("segments_mapped", 0))
                row["map_ms_per_segment"] = 1000 * (st.get("map_seconds", 0)
                                                    - sealer.get("map_seconds", 0)) / mapped
                row["map_cpu_ms_per_segment"] = 1000 * (st.get("map_cpu_seconds", 0)
                                                        - sealer.get("map_cpu_seconds", 0)) / mapped
                row["map_busy"] = mapped * row["map_ms_per_segment"] / 1000 / max(r["seconds"], 1e-9)
                row["checkpoints"] = st.get("checkpoints", 0) - sealer.get("checkpoints", 0)
                row["checkpoint_cpu_seconds"] = (st.get("checkpoint_cpu_seconds", 0)
                                                 - sealer.get("checkpoint_cpu_seconds", 0))
                row["checkpoint_seconds"] = (st.get("checkpoint_seconds", 0)
                                             - sealer.get("checkpoint_seconds", 0))
                row["system"] = sysr
                sealer = st
                rounds.append(row)
                print(f"  {human(written):>10} {r['iops']:8.0f} {st['extents']:10d} "
                      f"{human(mapf):>10} {row['bytes_per_extent']:8.0f} "
                      f"{human(anon * 1024):>9} {human(file * 1024):>9} "
                      f"{os.getloadavg()[0]:5.1f} {row['map_ms_per_segment']:10.0f} "
                      f"{row['map_cpu_ms_per_segment']:5.0f} {100 * row['map_busy']:4.0f}%",
                      flush=True)
                print(f"  {'':>10} CPU us/write: server {sysr['server_user_us']:.1f} user "
                      f"{sysr['server_sys_us']:.1f} sys (waited for a core "
                      f"{sysr['server_wait_us']:.1f}), children {sysr['children_us']:.1f}, "
                      f"kswapd {sysr['kswapd_us']:.1f}; machine busy {100 * sysr['busy']:.0f}% "
                      f"(steal {100 * sysr['steal']:.0f}%); free {human(sysr['mem_free_kib'] * 1024)}, "
                      f"cached {human(sysr['cached_kib'] * 1024)}, dirty "
                      f"{human(sysr['dirty_kib'] * 1024)}; scanned {sysr['scanned_per_write']:.2f} "
                      f"pages/write; disk reads of page faults per 1,000 writes: server "
                      f"{sysr['server_majflt_per_kwrite']:.1f}, children "
                      f"{sysr['children_majflt_per_kwrite']:.1f}; checkpoints {row['checkpoints']} "
                      f"({row['checkpoint_seconds']:.1f} s, {row['checkpoint_cpu_seconds']:.1f} s CPU)",
                      flush=True)
            out["rounds"] = rounds
            phases = {"writes": rss.phase()}
            eighth = max(1, len(rounds) // 8)
            first = sum(x["iops"] for x in rounds[:eighth]) / eighth
            last = sum(x["iops"] for x in rounds[-eighth:]) / eighth
            out["iops_first"], out["iops_last"] = first, last
            if args.only_writes:
                return out
            frag = frag_and_read(lsbd.uri, region, args.fio_compress, lsbd.stats)
            out["lsbd_frag"] = frag
            phases["frag"] = rss.phase()
            print(f"  frag writes in the region: {frag['frag_write']['iops']:.0f} IOPS; "
                  f"then seq read 1M: {frag['seq_read']['mib_s']:.0f} MiB/s, again "
                  f"{frag['seq_read_again']['mib_s']:.0f} MiB/s", flush=True)
            started = time.monotonic()
            lsbd.checkpoint()
            out["checkpoint_seconds"] = time.monotonic() - started
            phases["checkpoint"] = rss.phase()
            out["rss_peak_anon_kib_by_phase"] = phases
            st = lsbd.stats()
            out["final_stats"] = st
            out["map_file"] = lsbd.map_file()
        finally:
            ckpts.close()
            rss.close()
        out["rss_peak_anon_kib"], out["rss_peak_file_kib"] = rss.peak_anon, rss.peak_file
        out["rss_peak_children_anon_kib"] = rss.peak_children_anon
        newest = max((os.path.dirname(p) for p in ckpts.seen), default=None)
        out["checkpoint_newest_bytes"] = dir_bytes(newest) if newest else 0
        out["checkpoint_total_bytes"] = ckpts.total
        total_written = writes + 2 * region
        out["checkpoint_fraction"] = ckpts.total / total_written
        ext = max(1, out["final_stats"]["extents"])
        print(f"  map: {out['final_stats']['extents']} extents, LMDB file "
              f"{human(out['map_file'])} = {out['map_file'] / ext:.0f} B/extent; "
              f"{json.dumps(out['final_stats'].get('map'))}", flush=True)
        print(f"  checkpoint: {out['checkpoint_seconds']:.1f} s, newest "
              f"{human(out['checkpoint_newest_bytes'])} "
              f"({out['checkpoint_newest_bytes'] / ext:.1f} B/extent); all written in the run "
              f"{human(ckpts.total)} = {100 * out['checkpoint_fraction']:.2f}% of "
              f"{human(total_written)} written", flush=True)
        print(f"  server peak RSS: {human(rss.peak_anon * 1024)} anonymous, "
              f"{human(rss.peak_file * 1024)} file; its child processes "
              f"{human(rss.peak_children_anon * 1024)} anonymous; peak anonymous by phase: "
              + ", ".join(f"{k} {human(v * 1024)}" for k, v in phases.items()), flush=True)
        lsbd.stop()
        reopen(lsbd, region, args.runtime, out)
        out["chain_open"] = chain_open(lsbd.store_dir)
        if not args.skip_nbdkit:
            drop_page_cache()
            with nbdkit(workdir, volume_size) as uri:
                fio(uri, "write", "1M", size=region, compress_pct=args.fio_compress)
                out["nbdkit_frag"] = frag = frag_and_read(uri, region, args.fio_compress)
            print(f"  nbdkit: frag writes {frag['frag_write']['iops']:.0f} IOPS; seq read 1M "
                  f"{frag['seq_read']['mib_s']:.0f} MiB/s, again "
                  f"{frag['seq_read_again']['mib_s']:.0f} MiB/s", flush=True)
    finally:
        lsbd.close()
        out["store_bytes"] = dir_bytes(lsbd.store_dir)
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    return out


def run_frag(args) -> dict:
    """--only-frag: the fill and the frag phase alone, lsbd then nbdkit."""
    volume_size = parse_size(args.volume_size)
    region = parse_size(args.region)
    out: dict = {"volume_size": volume_size, "create": args.create, "region": region,
                 "loadavg_start": os.getloadavg()}
    workdir = work_dir("lsbd-scale-bench-", args.workdir)
    print(f"frag phase only: volume {human(volume_size)} (lsbd create "
          f"{args.create or 'defaults'}), region {human(region)}; work dir {workdir}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    lsbd = Lsbd(workdir, volume_size, args.create.split())
    try:
        drop_page_cache()
        lsbd.start()
        fill = fio(lsbd.uri, "write", "1M", size=region, compress_pct=args.fio_compress)
        print(f"  fill {human(region)}: {fill['mib_s']:.0f} MiB/s", flush=True)
        out["lsbd_frag"] = frag = frag_and_read(lsbd.uri, region, args.fio_compress, lsbd.stats)
        print(f"  lsbd: frag writes {frag['frag_write']['iops']:.0f} IOPS; seq read 1M "
              f"{frag['seq_read']['mib_s']:.0f} MiB/s, again "
              f"{frag['seq_read_again']['mib_s']:.0f} MiB/s", flush=True)
        lsbd.stop()
        if not args.skip_nbdkit:
            drop_page_cache()
            with nbdkit(workdir, volume_size) as uri:
                fio(uri, "write", "1M", size=region, compress_pct=args.fio_compress)
                out["nbdkit_frag"] = frag = frag_and_read(uri, region, args.fio_compress)
            print(f"  nbdkit: frag writes {frag['frag_write']['iops']:.0f} IOPS; seq read 1M "
                  f"{frag['seq_read']['mib_s']:.0f} MiB/s, again "
                  f"{frag['seq_read_again']['mib_s']:.0f} MiB/s", flush=True)
    finally:
        lsbd.close()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    return out


def report_frag(out: dict) -> None:
    if "nbdkit_frag" in out:
        for job, label in (("seq_read", "first pass"), ("seq_read_again", "second pass")):
            a = out["lsbd_frag"][job]["mib_s"]
            b = out["nbdkit_frag"][job]["mib_s"]
            print(f"seq read 1M after random writes, {label}: {a:.0f} vs nbdkit {b:.0f} MiB/s: "
                  f"ratio {a / b:.2f} (target >= 0.5)")
    for job, label in (("seq_read", "first pass"), ("seq_read_again", "second pass")):
        r = out["lsbd_frag"][job]
        if "read_defrag_bytes" in r:
            print(f"  lsbd's {label}: relocated {r['read_defrag_bytes'] / 2**20:.0f} MiB, dropped "
                  f"{r['read_defrag_dropped_bytes'] / 2**20:.0f} MiB; the sealer mapped "
                  f"{r['segments_mapped']} segments in {r['map_seconds']:.1f} s")
    print(f"load average at start {out['loadavg_start'][0]:.1f}, at end "
          f"{out['loadavg_end'][0]:.1f} (2 cores, shared)")


def report(out: dict) -> None:
    print()
    print(f"write IOPS first eighth {out['iops_first']:.0f}, last eighth {out['iops_last']:.0f}: "
          f"ratio {out['iops_last'] / out['iops_first']:.2f} (target >= 0.9)")
    ext = max(1, out["final_stats"]["extents"])
    print(f"map bytes per extent {out['map_file'] / ext:.0f} (target <= 64)")
    print(f"checkpoints {100 * out['checkpoint_fraction']:.2f}% of bytes written (target <= 2%)")
    print(f"open from the store {out['open_seconds']:.1f} s (target <= 10)")
    if "chain_open" in out:
        c = out["chain_open"]
        print(f"  the longest chain's map loaded alone {c['seconds']:.1f} s ({c['base_extents']} "
              f"extents and {c['chain']} deltas of {c['delta_entries']} entries)")
    print(f"peak anonymous RSS {out['rss_peak_anon_kib'] / 1024:.0f} MiB, after the reopen "
          f"{out['reopen_rss_peak_anon_kib'] / 1024:.0f} MiB (target <= 256); the server's "
          f"child processes {out['rss_peak_children_anon_kib'] / 1024:.0f} MiB")
    report_frag(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume-size", default="1T", help="volume size (default 1T)")
    ap.add_argument("--writes", default="4G", help="bytes of random 4 KiB writes (default 4G)")
    ap.add_argument("--round", default="1G", help="bytes per IOPS round (default 1G)")
    ap.add_argument("--region", default="1G",
                    help="region filled, fragmented and read sequentially (default 1G)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds of the cold random reads (default 10)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the temporary directory goes")
    ap.add_argument("--create", default="", metavar="ARGS",
                    help="more arguments for lsbd create, e.g. '--compress none'")
    ap.add_argument("--skip-nbdkit", action="store_true", help="no nbdkit comparison")
    ap.add_argument("--only-frag", action="store_true",
                    help="only the fill and the frag phase (sequential reads after random "
                         "writes), against nbdkit")
    ap.add_argument("--only-writes", action="store_true",
                    help="stop after the random writes (steps 1-2: the IOPS rounds)")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--fio-compress", type=int, default=0, metavar="PCT",
                    help="fio writes buffers that compress by about PCT%% (default 0)")
    ap.add_argument("--reopen", metavar="WORKDIR",
                    help="only open the store of a kept run again (steps 5-6)")
    args = ap.parse_args()
    if args.reopen:
        return run_reopen(args)
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"scale_bench: {tool} is needed", file=sys.stderr)
            return 2
    if args.only_frag:
        out = run_frag(args)
        print()
        report_frag(out)
    else:
        out = run(args)
        if args.only_writes:
            out["loadavg_end"] = os.getloadavg()
            print(f"\nwrite IOPS first eighth {out['iops_first']:.0f}, last eighth "
                  f"{out['iops_last']:.0f}: ratio {out['iops_last'] / out['iops_first']:.2f}; "
                  f"load average at start {out['loadavg_start'][0]:.1f}, at end "
                  f"{out['loadavg_end'][0]:.1f}")
        else:
            report(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
