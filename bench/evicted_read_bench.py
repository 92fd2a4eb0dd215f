"""Sequential reads of a fragmented region whose segments the cache evicted.

    .venv/bin/python bench/evicted_read_bench.py [--volume-size 64G] [--writes 4G]
        [--region 1G] [--create ARGS] [--fio-compress 75] [--state DIR] [--pre-writes SIZE]
        [--frag-writes [--settle SECONDS] [--restart]] [--spy DIR [--spy-gil]] [--json FILE]
        [SUBJECT ...]

The frag phase of bench/scale_bench.py after its random writes, at a size
that builds in two minutes: a volume (default: the defaults, zstd) of
--volume-size, --region filled with 1 MiB writes, --writes of random
4 KiB writes over the whole volume (64 GiB over 1 TiB writes 1/16 of the
blocks; so do the defaults here), then --region of random 4 KiB writes
inside the region.  The server is stopped and the state kept in --state
(built only if it is not there).  A compressed volume's cache holds
1 GiB of segments by default, so the region's fill and the volume's
random writes are read from the store, as in the 64 GiB run.

Each SUBJECT (NAME@DIR: the code in DIR, e.g. main@/work/main; default:
this checkout; NAME@DIR@ARGS also passes ARGS, split at spaces, to `lsbd
serve`, e.g. "big@/work/main@--cache-limit 4G") gets a fresh copy of the state (the store's objects as
hard links), at the path it was built
in (the cache dir is named after the store's URL), is served, writes
one block far from the region (read-directed defragmentation works only
in a session that has written, as scale_bench's server has), and reads
the region twice with fio (1 MiB, iodepth 16), the page cache dropped
before each pass.  --frag-writes (with a --state of its own): the state
is built without the region's random writes, each subject makes them, and
the passes start right after, while the server still seals, maps and
uploads those writes, as in scale_bench's frag phase; --settle SECONDS
waits that long after them, --restart serves the passes from a server
started afresh after them.  --pre-writes SIZE: each subject first makes
SIZE of random 4 KiB writes over the whole volume, which its map still
holds staged (lsbd.map.staged, not yet merged into the extents) when the
frag writes and the passes come, as at the end of scale_bench's writes.
Reported per subject: MiB/s of both passes, the bytes
read-directed defragmentation relocated, and the server's peak
anonymous RSS in each pass, and the server's processor time and disk
reads per MiB read in each pass, the system part of that time, and the
processor time of its child processes (the map's process and the sealing
worker) per MiB (/proc/PID/stat and io), and the checkpoints the server
completed during each pass and their processor time, the segments staged
in the map when each pass starts, and the segments the sealer entered into
the map during each pass and the time it took, and the time of a
checkpoint made after the passes (wall and the server's processor time);
and, from servers that count them (`lsbd stats`), the bytes each pass
read from local copies and from the store and the segments the cache
evicted during it, and how busy the disk under the state was during each
pass (/proc/diskstats: the share of the time it was busy, the requests
in flight on average, and a read request's size and time).
--spy DIR: a py-spy profile of each pass and of that checkpoint
(NAME-first.txt, NAME-second.txt, NAME-checkpoint.txt; raw format, idle
threads included; --spy-gil: only the thread holding the GIL), and what
py-spy said beside each (.txt.log); DIR is made if missing.
Needs fio and root (to drop caches).  Compare subjects within one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import code_path, drop_page_cache, fio, parse_size
import scale_bench as sb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: In a state built for --frag-writes (no frag writes of its own): the
#: subjects then make the region's only layer of random writes.
FRAG_LATER = "frag-writes-later"
#: The cache's counters in `lsbd stats` reported per pass.
CACHE_COUNTS = ("local_read_bytes", "store_read_bytes", "cache_evicted_segments",
                "cache_evicted_bytes")


def build(state: str, volume_size: int, writes: int, region: int, create: list[str],
          pct: int, frag: bool = True) -> dict:
    os.makedirs(state)
    lsbd = sb.Lsbd(state, volume_size, create)
    try:
        lsbd.start()
        out = {"fill_mib_s": fio(lsbd.uri, "write", "1M", size=region,
                                 compress_pct=pct)["mib_s"]}
        if writes:
            out["random_iops"] = fio(lsbd.uri, "randwrite", "4k", size=volume_size,
                                     io_size=writes, compress_pct=pct)["iops"]
        if frag:
            out["frag_iops"] = fio(lsbd.uri, "randwrite", "4k", size=region, io_size=region,
                                   compress_pct=pct)["iops"]
        else:
            open(os.path.join(state, FRAG_LATER), "w").close()
        st = lsbd.stats()
        out.update({k: st.get(k) for k in ("segments", "extents", "cache_segments")})
        return out
    finally:
        lsbd.close()


def _usage(pid: int) -> tuple[float, float, int]:
    """A process's processor seconds in user and in system mode, and bytes
    read from the disk so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/io") as f:
        io = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields[11]) / tick, int(fields[12]) / tick, int(io["read_bytes"])


def _children_cpu(pid: int) -> float:
    """Processor seconds so far of a process's children (the map's process,
    the sealing worker: they compress and map what read-directed
    defragmentation writes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue      # gone meanwhile
        if int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _disk_counts(path: str) -> list[int] | None:
    """/proc/diskstats of the disk holding `path`: reads done, sectors
    read, ms spent reading, ms the disk was busy, ms of requests in flight
    summed; None if the disk is not listed there."""
    dev = os.stat(path).st_dev
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == (os.major(dev), os.minor(dev)):
                return [int(fields[i]) for i in (3, 5, 6, 12, 13)]
    return None


def _timed_pass(pid: int, uri: str, region: int, out: dict, name: str,
                disk_path: str | None = None) -> None:
    """One read of the region: MiB/s, and the server's processor ms and
    disk MiB per MiB read, and its children's processor ms; with disk_path,
    how busy the disk under it was (the whole machine's reads)."""
    user0, sys0, disk0 = _usage(pid)
    children0 = _children_cpu(pid)
    dev0 = _disk_counts(disk_path) if disk_path else None
    started = time.time()
    out[name] = fio(uri, "read", "1M", size=region, io_size=region)["mib_s"]
    user1, sys1, disk1 = _usage(pid)
    if dev0 is not None:
        dev1 = _disk_counts(disk_path) or dev0
        ios, sectors, read_ms, busy_ms, queued_ms = (b - a for a, b in zip(dev0, dev1))
        wall_ms = (time.time() - started) * 1000
        out[f"{name}_disk_busy"] = round(busy_ms / wall_ms, 3)
        out[f"{name}_disk_queue"] = round(queued_ms / wall_ms, 2)   # requests in flight, mean
        out[f"{name}_disk_read_kib"] = round(sectors / 2 / max(1, ios), 1)   # a request
        out[f"{name}_disk_read_ms"] = round(read_ms / max(1, ios), 3)        # a request
    out[f"{name}_children_cpu_ms_per_mib"] = round(
        (_children_cpu(pid) - children0) * 1000 / (region / (1 << 20)), 2)
    out[f"{name}_time"] = [started, time.time()]
    mib = region / (1 << 20)
    out[f"{name}_cpu_ms_per_mib"] = round((user1 - user0 + sys1 - sys0) * 1000 / mib, 2)
    out[f"{name}_sys_ms_per_mib"] = round((sys1 - sys0) * 1000 / mib, 2)
    out[f"{name}_disk_mib_per_mib"] = round((disk1 - disk0) / (1 << 20) / mib, 3)


def copy_state(state: str, work: str) -> None:
    """A fresh copy of the kept state: the store's objects as hard links (a
    file:// store never changes an object in place: a put writes a new file
    and renames it, a delete unlinks it; at 64 GiB of writes the store is
    some 20 GB, too much to copy for every subject), the rest copied."""
    os.makedirs(work)
    for name in os.listdir(state):
        link = ["-l"] if name == "store" else []
        subprocess.run(["cp", "-a", *link, os.path.join(state, name), work], check=True)


#: More py-spy arguments (--spy-gil: only the samples of the thread holding the GIL).
SPY_ARGS: list[str] = []


def _py_spy() -> str:
    return shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")


def _check_spy(folder: str) -> None:
    """--spy DIR: made if missing, and py-spy there, before anything is built
    (py-spy's own errors would otherwise go unseen until the profiles are
    missing at the end)."""
    if not os.access(_py_spy(), os.X_OK):
        sys.exit(f"--spy: py-spy not found (on the PATH or beside {sys.executable}); "
                 "install it: pip install py-spy")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        sys.exit(f"--spy: cannot make {folder}: {e.strerror}")


def _spy(pid: int, path: str) -> subprocess.Popen:
    """py-spy recording `pid` into `path` (raw format, idle threads
    included); what it says goes to path + '.log'."""
    with open(path + ".log", "wb") as said:
        prof = subprocess.Popen(
            [_py_spy(), "record", "-p", str(pid), "-o", path, "--format", "raw", "-r", "50",
             "--threads", "--idle", *SPY_ARGS], stdout=said, stderr=subprocess.STDOUT)
    time.sleep(1)
    if prof.poll() is not None:
        print(f"py-spy stopped at once (exit {prof.returncode}): see {path}.log",
              file=sys.stderr, flush=True)
    return prof


def read_subject(state: str, work: str, code: str, region: int, spy: str | None,
                 frag_pct: int | None = None, settle: float = 0,
                 restart: bool = False, pre_writes: int = 0,
                 serve_args: list[str] | None = None) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    copy_state(state, work)
    here = os.getcwd()
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = code_path(code)
    os.chdir(code)        # python -m puts the working directory first on the path
    lsbd = sb.Lsbd(work, 0, [], create=False, serve_args=serve_args)
    try:
        lsbd.start()
        rss = sb.RssSampler(lsbd.proc.pid)
        out: dict = {"load": [os.getloadavg()[0]]}
        fio(lsbd.uri, "write", "4k", size=4096, offset=region * 40)
        if pre_writes:
            # As the end of scale_bench's writes: random 4 KiB writes over the
            # whole volume that the server has not merged into its map's
            # extents yet (staged segments, lsbd.map.staged) when the frag
            # phase starts.
            fio(lsbd.uri, "randwrite", "4k", size=lsbd.stats()["size"], io_size=pre_writes,
                compress_pct=frag_pct if frag_pct is not None else 75)
        if frag_pct is not None:
            # As scale_bench does: the passes start right after the writes,
            # while the server still seals, maps and uploads them.
            out["frag_iops"] = fio(lsbd.uri, "randwrite", "4k", size=region, io_size=region,
                                   compress_pct=frag_pct)["iops"]
            time.sleep(settle)
            if restart:
                lsbd.stop()
                lsbd.start()
                rss.close()
                rss = sb.RssSampler(lsbd.proc.pid)
                fio(lsbd.uri, "write", "4k", size=4096, offset=region * 40)
        drop_page_cache()
        for name in ("first", "second"):
            if name == "second":
                drop_page_cache()
            prof = _spy(lsbd.proc.pid, f"{spy}-{name}.txt") if spy else None
            before = lsbd.stats()
            out[f"{name}_staged_segments"] = before["map"].get("staged_segments")
            _timed_pass(lsbd.proc.pid, lsbd.uri, region, out, name, work)
            after = lsbd.stats()
            # The sealer's time entering segments into the map during the pass
            # (a segment of longer records merges the staged ones first).
            out[f"{name}_map_seconds"] = round(after["map_seconds"] - before["map_seconds"], 2)
            out[f"{name}_segments_mapped"] = after["segments_mapped"] - before["segments_mapped"]
            out[f"{name}_checkpoints"] = after["checkpoints"] - before["checkpoints"]
            out[f"{name}_checkpoint_cpu_s"] = round(
                after["checkpoint_cpu_seconds"] - before["checkpoint_cpu_seconds"], 2)
            # Where the pass's blocks came from, and what the cache evicted
            # meanwhile (servers that count them: `lsbd stats`).
            for key in CACHE_COUNTS:
                if key in after:
                    out[f"{name}_{key}"] = after[key] - before[key]
            if name == "first" and "cache_evicted_segments" in before:
                out["evicted_before_first"] = before["cache_evicted_segments"]
            if prof is not None:
                prof.send_signal(2)
                prof.wait()
            out[f"peak_anon_{name}_kib"] = rss.phase()
        st = lsbd.stats()
        out["read_defrag_bytes"] = st.get("read_defrag_bytes")
        out["read_defrag_dropped_bytes"] = st.get("read_defrag_dropped_bytes", 0)
        # The checkpoint put off while the passes read (its delta holds the
        # segments they relocated), as scale_bench's checkpoint phase runs it.
        before = lsbd.stats()
        prof = _spy(lsbd.proc.pid, f"{spy}-checkpoint.txt") if spy else None
        started = time.perf_counter()
        lsbd.checkpoint()
        out["checkpoint_s"] = round(time.perf_counter() - started, 2)
        if prof is not None:
            prof.send_signal(2)
            prof.wait()
        out["checkpoint_cpu_s"] = round(lsbd.stats()["checkpoint_cpu_seconds"] -
                                        before["checkpoint_cpu_seconds"], 2)
        out["load"].append(os.getloadavg()[0])
        rss.close()
        return out
    finally:
        lsbd.close()
        os.chdir(here)
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before
        shutil.rmtree(work, ignore_errors=True)


def _cache_counts(r: dict) -> str:
    """The cache's counters of each pass, if the subject's server had them."""
    if "first_store_read_bytes" not in r:
        return ""
    mib = 1 << 20
    return "".join(
        f"; {name} pass MiB from local copies / the store "
        f"{r[f'{name}_local_read_bytes'] / mib:.0f} / {r[f'{name}_store_read_bytes'] / mib:.0f}, "
        f"evicted {r[f'{name}_cache_evicted_segments']} segments; disk busy "
        f"{r.get(f'{name}_disk_busy')}, queue {r.get(f'{name}_disk_queue')}, "
        f"{r.get(f'{name}_disk_read_kib')} KiB / {r.get(f'{name}_disk_read_ms')} ms a read"
        for name in ("first", "second")) + \
        f"; evicted before the first pass {r.get('evicted_before_first')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("subjects", nargs="*", metavar="NAME@DIR")
    ap.add_argument("--volume-size", default="64G")
    ap.add_argument("--writes", default="4G", help="random 4 KiB writes over the volume")
    ap.add_argument("--region", default="1G")
    ap.add_argument("--create", default="", metavar="ARGS", help="more arguments for lsbd create")
    ap.add_argument("--fio-compress", type=int, default=75, metavar="PCT")
    ap.add_argument("--state", default="/var/tmp/lsbd-evicted-read-state",
                    help="where the built state is kept (built if absent)")
    ap.add_argument("--spy", metavar="DIR", help="py-spy profiles of each pass here")
    ap.add_argument("--spy-gil", action="store_true",
                    help="with --spy: sample only the thread holding the GIL (py-spy --gil)")
    ap.add_argument("--frag-writes", action="store_true",
                    help="the state is built without the region's random writes, and each "
                         "subject makes them right before its passes, as scale_bench does "
                         "(needs a --state of its own)")
    ap.add_argument("--settle", type=float, default=0, metavar="SECONDS",
                    help="with --frag-writes: wait this long between the writes and the passes")
    ap.add_argument("--restart", action="store_true",
                    help="with --frag-writes: serve the passes from a server started afresh "
                         "after the writes")
    ap.add_argument("--pre-writes", default="0", metavar="SIZE",
                    help="random 4 KiB writes over the whole volume by each subject before "
                         "its frag writes, left staged in its map as at the end of "
                         "scale_bench's writes")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    region = parse_size(args.region)
    if args.spy:
        _check_spy(args.spy)
    if args.spy_gil:
        SPY_ARGS.append("--gil")
    state = os.path.abspath(args.state)
    kept = state + ".kept"
    out: dict = {}
    if not os.path.exists(kept):
        shutil.rmtree(state, ignore_errors=True)
        drop_page_cache()
        out["build"] = build(state, parse_size(args.volume_size), parse_size(args.writes),
                             region, args.create.split(), args.fio_compress,
                             frag=not args.frag_writes)
        print("built:", json.dumps(out["build"]), flush=True)
        os.rename(state, kept)
    if os.path.exists(os.path.join(kept, FRAG_LATER)) != args.frag_writes:
        sys.exit(f"{kept} was built with its own random writes in the region: --frag-writes "
                 "needs a --state of its own" if args.frag_writes else
                 f"{kept} was built for --frag-writes (no random writes in the region)")
    subjects = args.subjects or [f"this@{REPO}"]
    for subject in subjects:
        name, _, code = subject.partition("@")
        code, _, serve_args = code.partition("@")
        spy = os.path.join(args.spy, name) if args.spy else None
        r = read_subject(kept, state, os.path.abspath(code or REPO), region, spy,
                         args.fio_compress if args.frag_writes else None, args.settle,
                         args.restart, parse_size(args.pre_writes), serve_args.split())
        out[name] = r
        print(f"{name}: first pass {r['first']:.1f} MiB/s, second {r['second']:.1f} MiB/s, "
              f"relocated {r['read_defrag_bytes'] / 1e6:.0f} MB (dropped "
              f"{r['read_defrag_dropped_bytes'] / 1e6:.0f}), peak anon "
              f"{r['peak_anon_first_kib'] / 1024:.0f} / {r['peak_anon_second_kib'] / 1024:.0f} MiB, "
              f"load {r['load'][0]:.1f}-{r['load'][1]:.1f}; server cpu ms/MiB "
              f"{r['first_cpu_ms_per_mib']} / {r['second_cpu_ms_per_mib']} (system "
              f"{r['first_sys_ms_per_mib']} / {r['second_sys_ms_per_mib']}; children "
              f"{r['first_children_cpu_ms_per_mib']} / {r['second_children_cpu_ms_per_mib']}), "
              f"disk MiB/MiB "
              f"{r['first_disk_mib_per_mib']} / {r['second_disk_mib_per_mib']}; checkpoints done "
              f"{r['first_checkpoints']} / {r['second_checkpoints']} ("
              f"{r['first_checkpoint_cpu_s']} / {r['second_checkpoint_cpu_s']} s); staged "
              f"segments at the start {r['first_staged_segments']} / "
              f"{r['second_staged_segments']}, segments mapped {r['first_segments_mapped']} / "
              f"{r['second_segments_mapped']} in {r['first_map_seconds']} / "
              f"{r['second_map_seconds']} s; the "
              f"checkpoint after them {r['checkpoint_s']} s ({r['checkpoint_cpu_s']} s of "
              f"processor time)" + _cache_counts(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
