"""Compaction (DESIGN: Compaction, invariant 6): space comes back after
overwrites, snapshots and clones stay exact, a writer can keep writing while
it runs (engine API and NBD with fio), and `lsbd compact` reports honestly.

Run with -s to see the measured store bytes against the live data."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from engine_helpers import open_test_store as open_url
from engine_helpers import live_bytes, overwrite, read_all, run_cli
from lsbd import names
from lsbd.history.compactor import compact
from lsbd.segments import checkpoints as ckpt
from lsbd.meta.config import create_volume
from lsbd.history.restore import create_clone
from lsbd.meta.snapshots import delete_snapshot, list_snapshots
from lsbd.segments.remote import store_segment_seqs
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.names import cache_dir_for
from lsbd.errors import LsbdError

MiB = 1024 * 1024
BS = 4096
REPO = Path(__file__).resolve().parent.parent.parent
LSBD = str(REPO / ".venv" / "bin" / "lsbd")

SIZE = 32 * MiB          # the volume
WORKING_SET = 16 * MiB   # the part that is overwritten
ROUNDS = 5


# --- helpers ----------------------------------------------------------------------------

def lsbd(url: str, cache, *args, check: bool = True, timeout: float = 120):
    return run_cli(*args, store=url, cache=cache, check=check, timeout=timeout)


def lsbd_json(url: str, cache, *args):
    return json.loads(lsbd(url, cache, *args, "--json").stdout)


def segment_bytes(store, volume: str) -> int:
    return sum(store_segment_seqs(store, volume).values())


def checkpoint_bytes(store, volume: str) -> int:
    return sum(i.size for i in store.list(names.checkpoint_prefix(volume)))


def listing(store, volume: str) -> list[tuple[str, int]]:
    return [(i.key, i.size) for i in store.list(names.volume_prefix(volume))]


def assert_reads(vol, model: bytes, rng: random.Random | None = None, count: int = 50) -> None:
    """The whole volume, then random unaligned ranges."""
    got = read_all(vol)
    assert got == model, f"volume differs from the model at byte {_first_diff(got, model)}"
    rng = rng or random.Random(0)
    for _ in range(count):
        off = rng.randrange(0, len(model) - 1)
        length = rng.randint(1, min(300 * 1024, len(model) - off))
        assert vol.read(off, length) == model[off:off + length], (off, length)


def _first_diff(a: bytes, b: bytes) -> int:
    for i in range(0, min(len(a), len(b)), BS):
        if a[i:i + BS] != b[i:i + BS]:
            return i
    return min(len(a), len(b))


def wipe_cache(cache, store, volume: str) -> None:
    shutil.rmtree(cache_dir_for(str(cache), store, volume), ignore_errors=True)


def report_figures(label: str, store, volume: str, live: int) -> float:
    seg = segment_bytes(store, volume)
    cps = checkpoint_bytes(store, volume)
    ratio = seg / live
    print(f"\n[{label}] store segment bytes {seg / MiB:.2f} MiB, checkpoints {cps / 1024:.0f} KiB, "
          f"live {live / MiB:.2f} MiB: {ratio:.2f}x live "
          f"({len(store_segment_seqs(store, volume))} segments)")
    return ratio


# --- 1. retain 0: overwrites come back ---------------------------------------------------

def test_compaction_reclaims_overwrites(store_url, tmp_path):
    cache = tmp_path / "cache"
    lsbd(store_url, cache, "create", "v", "--size", "32M", "--segment-size", "1M",
         "--retain", "0")
    store = open_url(store_url)
    rng = random.Random(1)
    model = bytearray(SIZE)
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        for _ in range(ROUNDS):
            overwrite(vol, model, rng, WORKING_SET)
    model = bytes(model)
    live = live_bytes(model)
    before = segment_bytes(store, "v")
    report_figures("before compaction", store, "v", live)
    assert before > 4 * live  # five overwrites really are in the store

    report = lsbd_json(store_url, cache, "compact", "v")
    ratio = report_figures("after lsbd compact", store, "v", live)
    assert ratio <= 1.5, f"store holds {ratio:.2f}x the live data after compaction"
    assert report["stored_bytes_before"] == before
    assert report["stored_bytes_after"] == segment_bytes(store, "v")
    assert report["bytes_reclaimed"] >= before - 1.5 * live

    lsbd(store_url, cache, "verify", "v")
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        assert vol.usage()["live_bytes"] == live
        assert_reads(vol, model, random.Random(2))
    wipe_cache(cache, store, "v")
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        assert_reads(vol, model, random.Random(3))
    assert verify_clean(store, "v", cache)


def verify_clean(store, volume: str, cache) -> bool:
    with Volume.open(store, volume, cache_root=str(cache), read_only=True) as ro:
        problems = ro.verify()
    assert problems == []
    return True


# --- 2. snapshots survive compaction; deleting them gives the space back -----------------

def test_snapshots_survive_compaction_then_reclaimed(store_url, tmp_path):
    cache = tmp_path / "cache"
    store = open_url(store_url)
    # Over S3 (moto) a quarter of the data, to keep the run short.
    scale = 4 if store_url.startswith("s3://") else 1
    size, span = SIZE // scale, WORKING_SET // scale
    create_volume(store, "v", size, segment_size=1 * MiB // scale, retain_seconds=0)
    rng = random.Random(5)
    model = bytearray(size)
    states: dict[str, tuple[int, bytes]] = {}
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        for i in range(ROUNDS):
            overwrite(vol, model, rng, span=span, amount=span)
            if i < ROUNDS - 1:
                snap = vol.snapshot(f"s{i}")
                states[snap.name] = (snap.seq, bytes(model))
        report = compact(vol, threshold=0.6)
        assert report.bytes_reclaimed > 0  # the garbage of the last round goes
        assert read_all(vol) == model
    model = bytes(model)
    live = live_bytes(model)
    print(f"\n[snapshots] before {report.stored_bytes_before / MiB:.2f} MiB, after "
          f"{report.stored_bytes_after / MiB:.2f} MiB, skipped (pinned) {report.skipped_pinned}, rewritten "
          f"{report.bytes_rewritten / MiB:.2f} MiB")
    report_figures("with 4 snapshots, compacted", store, "v", live)
    assert sorted(s.name for s in list_snapshots(store, open_cfg(store, "v"))) == sorted(states)

    # Each snapshot reads back exactly: through the engine, with no cache at all ...
    for name, (seq, state) in states.items():
        with Volume.open(store, "v", cache_root=str(cache), at_seq=seq) as past:
            assert read_all(past) == state, f"snapshot {name} changed after compaction"
    # ... and through the CLI.
    out = tmp_path / "s1.img"
    lsbd(store_url, cache, "export", "v", out, "--snapshot", "s1")
    assert out.read_bytes() == states["s1"][1]
    lsbd(store_url, cache, "verify", "v")

    # Compacting again (nothing changed) keeps them too.
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        compact(vol, threshold=1.0)
    for name, (seq, state) in states.items():
        with Volume.open(store, "v", cache_root=str(cache), at_seq=seq) as past:
            assert read_all(past) == state, f"snapshot {name} changed after a second compaction"

    # Delete them (CLI for one, engine for the rest) and compact: the space comes back.
    lsbd(store_url, cache, "snapshot", "delete", "v", "s0")
    for name in ("s1", "s2", "s3"):
        delete_snapshot(store, open_cfg(store, "v"), name)
    lsbd(store_url, cache, "compact", "v")
    ratio = report_figures("snapshots deleted, compacted", store, "v", live)
    assert ratio <= 1.5
    # The snapshots' checkpoints went with them.
    assert all(seq not in ckpt.list_checkpoints(store, "v") for seq, _ in states.values())
    lsbd(store_url, cache, "verify", "v")
    wipe_cache(cache, store, "v")
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        assert_reads(vol, model, random.Random(6))


def open_cfg(store, volume):
    from lsbd.meta.config import load_config

    return load_config(store, volume)


# --- 4a. a writer keeps writing while compaction runs (engine API) ------------------------

WRITES_PER_COMPACTION = 1500

def test_compaction_while_writing(store_url, tmp_path):
    cache = tmp_path / "cache"
    store = open_url(store_url)
    size = 8 * MiB
    nblocks = size // BS
    create_volume(store, "v", size, segment_size=256 * 1024, retain_seconds=0,
                  seal_interval=0.5, checkpoint_segments=16)
    vol = Volume.open(store, "v", cache_root=str(cache))
    model = bytearray(size)
    writers = 3
    per = nblocks // writers
    locks = [threading.Lock() for _ in range(writers)]
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"writes": 0, "reads": 0, "compactions": 0, "reclaimed": 0, "rewritten": 0}

    def guard(fn):
        def run(*args):
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                stop.set()
        return run

    def check_range(i: int, rng: random.Random) -> None:
        lo = rng.randrange(i * per, (i + 1) * per)
        n = rng.randint(1, min(64, (i + 1) * per - lo))
        with locks[i]:
            got = vol.read(lo * BS, n * BS)
            want = bytes(model[lo * BS:(lo + n) * BS])
        assert got == want, f"writer {i}: blocks {lo}+{n} differ from the model"
        counts["reads"] += 1

    @guard
    def writer(i: int) -> None:
        rng = random.Random(100 + i)
        while not stop.is_set():
            # At most WRITES_PER_COMPACTION writes per compaction begun: on a
            # slow store the writers would otherwise bury the compactor in
            # garbage (hundreds of MB in a minute on moto) and the test
            # would measure the store, not the overlap.
            if counts["writes"] > WRITES_PER_COMPACTION * (counts["compactions"] + 1):
                time.sleep(0.01)
                continue
            n = rng.choice([1, 1, 2, 16])
            lba = rng.randrange(i * per, (i + 1) * per - n + 1)
            kind = rng.random()
            with locks[i]:
                if kind < 0.9:
                    data = rng.randbytes(n * BS)
                    vol.write(lba * BS, data)
                    model[lba * BS:(lba + n) * BS] = data
                elif kind < 0.95:
                    vol.write_zeroes(lba * BS, n * BS)
                    model[lba * BS:(lba + n) * BS] = bytes(n * BS)
                else:
                    vol.trim(lba * BS, n * BS)
                    model[lba * BS:(lba + n) * BS] = bytes(n * BS)
            counts["writes"] += 1
            if rng.random() < 0.2:
                check_range(i, rng)
            if rng.random() < 0.01:
                vol.flush()

    @guard
    def reader() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            check_range(rng.randrange(writers), rng)

    @guard
    def compactor() -> None:
        while not stop.is_set():
            r = compact(vol, threshold=1.0)
            counts["compactions"] += 1
            counts["reclaimed"] += r.bytes_reclaimed
            counts["rewritten"] += r.bytes_rewritten

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    threads += [threading.Thread(target=reader), threading.Thread(target=compactor)]
    # Some data first, so the first compaction has something to move.
    for lba in range(0, nblocks, 8):
        data = random.Random(lba).randbytes(4 * BS)
        vol.write(lba * BS, data)
        model[lba * BS:(lba + 4) * BS] = data
    started = time.monotonic()
    for t in threads:
        t.start()
    deadline = started + 4.0
    while time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.1)
    # Let at least three compactions finish under load.
    while counts["compactions"] < 3 and not stop.is_set() and time.monotonic() < started + 60:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(120)
    try:
        if errors:
            raise errors[0]
        print(f"\n[concurrent] {counts} in {time.monotonic() - started:.1f}s")
        assert counts["compactions"] >= 3 and counts["writes"] > 100
        assert counts["reclaimed"] > 0
        assert read_all(vol) == model
        final = compact(vol, threshold=1.0)
        assert read_all(vol) == model
        report_figures("concurrent, final compaction", store, "v", max(live_bytes(model), 1))
        assert final.stored_bytes_after <= 1.5 * live_bytes(model) + 64 * 1024
    finally:
        vol.close()
    model = bytes(model)
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        assert read_all(vol) == model
    wipe_cache(cache, store, "v")
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        assert read_all(vol) == model
    assert verify_clean(store, "v", cache)


# --- 4b. NBD: fio verifies its writes while `lsbd compact` runs ---------------------------

@pytest.mark.nbd
def test_compaction_under_fio_over_nbd(tmp_path):
    from nbd_helpers import require_tools

    require_tools("fio", "nbdcopy")   # a failure, not a skip, in CI
    # Short paths: the control socket lives in the cache dir (AF_UNIX limit).
    short = Path(tempfile.mkdtemp(prefix="lc", dir="/tmp"))
    try:
        _fio_run(short, tmp_path)
    finally:
        shutil.rmtree(short, ignore_errors=True)


#: At most this many fio passes to see three compactions run beside one.
FIO_PASSES = 4


def _fio_run(short: Path, tmp_path: Path) -> None:
    url = f"file://{short}/store"
    cache = short / "c"
    sock = short / "nbd.sock"
    lsbd(url, cache, "create", "v", "--size", "64M", "--segment-size", "1M", "--retain", "0")
    server = subprocess.Popen(
        [LSBD, "--store", url, "--cache-dir", str(cache), "serve", "v", "--socket", str(sock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    fio = None
    try:
        line = server.stderr.readline()
        assert "serving" in line, line + server.stderr.read()
        uri = f"nbd+unix:///v?socket={sock}"
        reports = []
        # fio passes until three compactions have run beside one: how many fit
        # in a pass depends on the machine's load, not on the product.
        for _ in range(FIO_PASSES):
            fio = subprocess.Popen(
                ["fio", "--name=compact", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                 "--bsrange=4k-64k", "--size=16m", "--numjobs=2", "--offset_increment=16m",
                 "--loops=32", "--iodepth=4", "--verify=crc32c", "--verify_backlog=128",
                 "--verify_fatal=1", "--do_verify=1", "--group_reporting",
                 "--verify_state_save=0",     # no state file in the working directory
                 "--output-format=json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            while fio.poll() is None:
                reports.append(lsbd_json(url, cache, "compact", "v", "--threshold", "1.0"))
                time.sleep(0.2)
            out, err = fio.communicate(timeout=120)
            assert fio.returncode == 0, f"fio failed ({fio.returncode}):\n{err}\n{out[-3000:]}"
            result = json.loads(out[out.index("{"):])
            job = result["jobs"][0]
            assert job["error"] == 0, job
            assert job["write"]["io_bytes"] >= 2 * 16 * MiB * 8
            assert job["read"]["io_bytes"] > 0  # it did read back what it wrote
            assert "verify" not in err.lower(), err
            if len(reports) >= 3:
                break
        assert len(reports) >= 3, f"only {len(reports)} compactions ran during fio"
        print(f"\n[nbd+fio] {len(reports)} compactions during fio, reclaimed "
              f"{sum(r['bytes_reclaimed'] for r in reports) / MiB:.1f} MiB, rewritten "
              f"{sum(r['bytes_rewritten'] for r in reports) / MiB:.1f} MiB")
        assert sum(r["bytes_reclaimed"] for r in reports) > 0
        # What a client reads now is what the store alone gives after a restart.
        image = tmp_path / "live.img"
        subprocess.run(["nbdcopy", uri, str(image)], check=True, timeout=120)
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.wait()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise
    assert server.returncode == 0, server.stderr.read()
    lsbd(url, cache, "verify", "v")
    store = open_url(url)
    lsbd(url, cache, "compact", "v")
    live = live_bytes(bytearray(image.read_bytes()))
    ratio = report_figures("nbd+fio, after a last compaction", store, "v", live)
    assert ratio <= 1.5
    wipe_cache(cache, store, "v")
    exported = tmp_path / "exported.img"
    lsbd(url, cache, "export", "v", exported)
    assert exported.read_bytes() == image.read_bytes()


# --- 6. clones --------------------------------------------------------------------------

def test_clone_survives_compaction_of_its_source(store_url, tmp_path):
    cache = tmp_path / "cache"
    store = open_url(store_url)
    size = 4 * MiB if store_url.startswith("s3://") else 16 * MiB
    create_volume(store, "src", size, segment_size=size // 32, retain_seconds=0)
    rng = random.Random(9)
    model = bytearray(size)
    with Volume.open(store, "src", cache_root=str(cache)) as vol:
        for _ in range(2):
            overwrite(vol, model, rng, span=size, amount=size // 2)
        snap = vol.snapshot("base")
    base_state = bytes(model)
    create_clone(store, open_cfg(store, "src"), "c", snap.seq, size=size,
                 cache_root=str(cache))
    clone_model = bytearray(base_state)
    with Volume.open(store, "c", cache_root=str(cache)) as c:
        assert read_all(c) == base_state
        overwrite(c, clone_model, random.Random(10), span=size, amount=size // 8)
    clone_state = bytes(clone_model)

    # The source moves on: overwritten, its snapshot deleted, compacted hard.
    with Volume.open(store, "src", cache_root=str(cache)) as vol:
        for _ in range(3):
            overwrite(vol, model, rng, span=size, amount=size)
    delete_snapshot(store, open_cfg(store, "src"), "base")
    lsbd(store_url, cache, "compact", "src", "--threshold", "1.0")
    lsbd(store_url, cache, "compact", "src", "--threshold", "1.0")
    with Volume.open(store, "src", cache_root=str(cache)) as vol:
        assert read_all(vol) == model
    src_live = live_bytes(model)
    report_figures("clone source, compacted (clone pins its base)", store, "src", src_live)

    # The clone reads exactly its own state: with its cache, and from the store alone.
    with Volume.open(store, "c", cache_root=str(cache)) as c:
        assert read_all(c) == clone_state
    wipe_cache(cache, store, "c")
    with Volume.open(store, "c", cache_root=str(cache)) as c:
        assert read_all(c) == clone_state
    lsbd(store_url, cache, "verify", "c")
    lsbd(store_url, cache, "verify", "src")

    # Compacting the clone works too, and only touches its own segments.
    src_segments = set(store_segment_seqs(store, "src"))
    with Volume.open(store, "c", cache_root=str(cache)) as c:
        overwrite(c, clone_model, random.Random(11), span=size, amount=size // 4)
        compact(c, threshold=1.0)
        assert read_all(c) == clone_model
    assert set(store_segment_seqs(store, "src")) == src_segments
    report_figures("clone's own segments after compaction", store, "c", live_bytes(clone_model))
    wipe_cache(cache, store, "c")
    with Volume.open(store, "c", cache_root=str(cache)) as c:
        assert read_all(c) == clone_model
    lsbd(store_url, cache, "verify", "c")
    with Volume.open(store, "src", cache_root=str(cache)) as vol:
        assert read_all(vol) == model


def test_clone_of_a_compacted_volume(tmp_path):
    """A clone taken after its source was compacted (the base's segments are
    the rewritten ones) reads right, and survives a later compaction."""
    cache = tmp_path / "cache"
    store = open_url(f"file://{tmp_path}/store")
    size = 8 * MiB
    create_volume(store, "src", size, segment_size=256 * 1024, retain_seconds=0)
    rng = random.Random(21)
    model = bytearray(size)
    with Volume.open(store, "src", cache_root=str(cache)) as vol:
        for _ in range(3):
            overwrite(vol, model, rng, span=size, amount=size)
        compact(vol, threshold=1.0)
        snap = vol.snapshot("b")
    state = bytes(model)
    create_clone(store, open_cfg(store, "src"), "c", snap.seq, size=size,
                 cache_root=str(cache))
    delete_snapshot(store, open_cfg(store, "src"), "b")
    with Volume.open(store, "src", cache_root=str(cache)) as vol:
        overwrite(vol, model, rng, span=size, amount=size)
        compact(vol, threshold=1.0)
        assert read_all(vol) == model
    wipe_cache(cache, store, "c")
    with Volume.open(store, "c", cache_root=str(cache), read_only=True) as c:
        assert read_all(c) == state


# --- 7. the command: --dry-run and --json -------------------------------------------------

def test_compact_dry_run_and_json_report(store_url, tmp_path):
    cache = tmp_path / "cache"
    store = open_url(store_url)
    size = 4 * MiB if store_url.startswith("s3://") else 8 * MiB
    create_volume(store, "v", size, segment_size=size // 16, retain_seconds=0)
    rng = random.Random(13)
    model = bytearray(size)
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        for _ in range(3):
            overwrite(vol, model, rng, span=size, amount=size)

    before = listing(store, "v")
    dry = lsbd_json(store_url, cache, "compact", "v", "--dry-run")
    assert listing(store, "v") == before, "a dry run changed the store"
    assert dry["dry_run"] is True
    assert dry["segments_read"] > 0 and dry["bytes_rewritten"] > 0
    assert dry["bytes_reclaimed"] > 0 and dry["segments_deleted"] > 0
    assert dry["segments_written"] == 0
    text = lsbd(store_url, cache, "compact", "v", "--dry-run")
    assert listing(store, "v") == before
    shown = text.stdout + text.stderr
    assert "dry run" in shown and "would reclaim" in shown, shown

    seg_before = store_segment_seqs(store, "v")
    report = lsbd_json(store_url, cache, "compact", "v")
    seg_after = store_segment_seqs(store, "v")
    fields = {"dry_run", "window", "segments_read", "segments_written", "segments_deleted",
              "checkpoints_deleted", "bytes_rewritten", "bytes_reclaimed", "stored_bytes_before",
              "stored_bytes_after", "skipped_pinned", "seconds", "write_amplification"}
    assert fields <= set(report), fields - set(report)
    print(f"\n[report] {report}")
    assert report["dry_run"] is False
    # The plan did not change between the dry run and the real one.
    assert report["segments_read"] == dry["segments_read"]
    assert report["bytes_rewritten"] == dry["bytes_rewritten"]
    # ... and the dry run predicted what it deleted (nothing wrote in between).
    assert report["bytes_reclaimed"] == dry["bytes_reclaimed"] > 0
    assert report["segments_deleted"] == dry["segments_deleted"]
    assert report["stored_bytes_before"] - report["bytes_reclaimed"] == dry["stored_bytes_after"]
    # Everything it says matches the store.
    deleted = set(seg_before) - set(seg_after)
    written = set(seg_after) - set(seg_before)
    assert report["stored_bytes_before"] == sum(seg_before.values())
    assert report["stored_bytes_after"] == sum(seg_after.values())
    assert report["segments_deleted"] == len(deleted)
    assert report["segments_written"] == len(written)
    assert report["bytes_reclaimed"] == sum(seg_before[s] for s in deleted)
    new_bytes = sum(seg_after[s] for s in written)
    assert report["bytes_rewritten"] <= new_bytes <= report["bytes_rewritten"] * 1.05 + 64 * 1024
    assert report["stored_bytes_after"] == (report["stored_bytes_before"]
                                            - report["bytes_reclaimed"] + new_bytes)
    assert report["write_amplification"] == pytest.approx(
        report["bytes_rewritten"] / report["bytes_reclaimed"], abs=1e-3)
    assert report["window"] == max(seg_before)  # retain 0: the window is the top
    assert report["seconds"] >= 0 and report["skipped_pinned"] == 0
    assert 0 < report["bytes_rewritten"] <= live_bytes(model)  # only live data moves

    # Nothing left to do: a second run reclaims nothing and rewrites nothing at 0.6.
    again = lsbd_json(store_url, cache, "compact", "v")
    assert again["segments_read"] == 0 and again["bytes_reclaimed"] == 0
    assert again["stored_bytes_before"] == again["stored_bytes_after"] == sum(seg_after.values())
    text = lsbd(store_url, cache, "compact", "v")
    assert "compaction of v" in text.stdout + text.stderr

    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        assert read_all(vol) == model


def test_dry_run_predicts_dead_segments_and_says_why_nothing_is_reclaimed(tmp_path):
    """A dry run counts what the run deletes, also segments left with no live
    block at all (not only the sparse ones it rewrites); a run that reclaims
    nothing says why: here the retention window, then a snapshot."""
    url = "file://" + str(tmp_path / "store")
    cache = tmp_path / "cache"
    store = open_url(url)
    create_volume(store, "v", 8 * MiB, segment_size=MiB, retain_seconds=86400)
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        for tag in (1, 2):               # the second pass leaves the first one's segments dead
            for off in range(0, 4 * MiB, MiB):
                vol.write(off, bytes([tag]) * MiB)
            vol.flush_to_store()
    dry = lsbd_json(url, cache, "compact", "v", "--dry-run")
    assert dry["bytes_reclaimed"] == 0 and dry["held_by_window_segments"] >= 4
    assert any("retention window" in w for w in dry["why"]), dry["why"]
    text = lsbd(url, cache, "compact", "v").stdout
    assert "retention window (retain 1d)" in text, text

    lsbd(url, cache, "snapshot", "create", "v", "s")
    lsbd(url, cache, "retain", "v", "0")
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        for off in range(0, 4 * MiB, MiB):
            vol.write(off, b"\3" * MiB)
    dry = lsbd_json(url, cache, "compact", "v", "--dry-run")
    assert dry["segments_read"] == 0, "nothing sparse: every segment is all live or all dead"
    assert dry["segments_deleted"] >= 4 and dry["bytes_reclaimed"] >= 4 * MiB
    before = store_segment_seqs(store, "v")
    report = lsbd_json(url, cache, "compact", "v")
    deleted = set(before) - set(store_segment_seqs(store, "v"))
    assert report["segments_deleted"] == dry["segments_deleted"] == len(deleted)
    assert report["bytes_reclaimed"] == dry["bytes_reclaimed"]
    # What is left dead is the snapshot's.
    assert report["held_by_points_segments"] >= 4
    assert any("snapshots" in w for w in report["why"]), report["why"]
    store.close()


# --- the retention window ---------------------------------------------------------------

def test_compaction_keeps_the_retention_window(tmp_path):
    """With retain > 0, every point after W (the newest seq sealed before
    now - retain) can still be rebuilt exactly after compaction, and so can W
    itself; what is older than the window is reclaimed."""
    cache = tmp_path / "cache"
    store = open_url(f"file://{tmp_path}/store")
    size = 4 * MiB
    retain = 3.0
    create_volume(store, "v", size, segment_size=128 * 1024, retain_seconds=retain)
    rng = random.Random(17)
    model = bytearray(size)
    states: dict[int, bytes] = {}
    with Volume.open(store, "v", cache_root=str(cache)) as vol:
        def batch():
            overwrite(vol, model, rng, span=size, amount=size // 2)
            states[vol.flush_to_store()] = bytes(model)

        for _ in range(4):
            batch()
        old_top = vol.applied_seq
        time.sleep(retain + 0.5)
        for _ in range(4):
            batch()
        top = vol.applied_seq
        before = segment_bytes(store, "v")
        report = compact(vol, threshold=1.0)
        assert read_all(vol) == model
    print(f"\n[window] W={report.window} (old history ends at {old_top}, top {top}); "
          f"{before / MiB:.1f} -> {segment_bytes(store, 'v') / MiB:.1f} MiB")
    assert old_top <= report.window < top
    assert report.bytes_reclaimed > 0  # the history before the window went
    inside = {seq: state for seq, state in states.items() if seq >= report.window}
    assert len(inside) >= 2
    for seq, state in inside.items():
        with Volume.open(store, "v", cache_root=str(cache), at_seq=seq) as past:
            assert past.applied_seq == seq
            assert read_all(past) == state, f"point {seq} inside the window changed"
    # Every seq of the window, not only the ones recorded, can still be rebuilt.
    from lsbd.plans.restore import plan_restore

    for seq in range(report.window, top + 1):
        plan_restore(ckpt.list_checkpoints(store, "v"), store_segment_seqs(store, "v"), seq)
    lsbd(f"file://{tmp_path}/store", cache, "verify", "v")


# --- past points that compaction reclaimed ------------------------------------------------

def _reclaimed_point(tmp_path):
    """A retain-0 volume where seq `a` (block 0 = 'A') was reclaimed by compaction."""
    cache = str(tmp_path / "cache")
    store = open_url(f"file://{tmp_path}/store")
    create_volume(store, "v", 1 * MiB, segment_size=64 * 1024, retain_seconds=0)
    with Volume.open(store, "v", cache_root=cache) as vol:
        vol.write(0, b"A" * BS)
        a = vol.flush_to_store()
        vol.write(0, b"B" * BS)
        vol.flush_to_store()
        compact(vol, threshold=1.0)
    return store, cache, a


def test_opening_a_reclaimed_point_fails(tmp_path):
    store, cache, a = _reclaimed_point(tmp_path)
    try:
        past = Volume.open(store, "v", cache_root=cache, at_seq=a)
    except LsbdError:  # refusing is right: the point is gone
        return
    with past:
        assert past.applied_seq == a and past.read(0, BS) == b"A" * BS, (
            f"opened seq {a} but got the state at seq {past.applied_seq}: "
            f"{past.read(0, 4)!r}")


def test_clone_of_a_reclaimed_point_is_refused(tmp_path):
    store, cache, a = _reclaimed_point(tmp_path)
    try:
        create_clone(store, open_cfg(store, "v"), "c", a, size=1 * MiB, cache_root=cache)
    except LsbdError:
        assert not store.exists(names.config_key("c"))
        return
    with Volume.open(store, "c", cache_root=cache) as c:
        assert c.read(0, BS) == b"A" * BS


# --- defragmentation: scattered ranges laid out in block order ------------------------------

def _scattered_volume(tmp_path, rng):
    """A volume whose first 4 MiB were written in order, then overwritten by
    random single blocks (and a zeroed run): many small extents."""
    store = open_url("file://" + str(tmp_path / "store"))
    create_volume(store, "v", SIZE, segment_size=MiB, retain_seconds=0)
    vol = Volume.open(store, "v", cache_root=str(tmp_path / "cache"))
    model = bytearray(SIZE)
    data = rng.randbytes(4 * MiB)
    vol.write(0, data)
    model[:4 * MiB] = data
    for _ in range(600):
        off = rng.randrange(0, 4 * MiB // BS) * BS
        block = rng.randbytes(BS)
        vol.write(off, block)
        model[off:off + BS] = block
    vol.write_zeroes(MiB + 8 * BS, 16 * BS)
    model[MiB + 8 * BS:MiB + 24 * BS] = bytes(16 * BS)
    vol.flush()
    return store, vol, model


def test_defrag_lays_scattered_ranges_out_in_order(tmp_path):
    rng = random.Random(7)
    store, vol, model = _scattered_volume(tmp_path, rng)
    try:
        vol.flush_to_store()
        before = testing.extent_count(vol)
        plan = compact(vol, dry_run=True, defrag=True)
        assert plan.windows_defragmented == 4 and segment_bytes(store, "v") > 0
        assert testing.extent_count(vol) == before, "a dry run changes nothing"
        report = compact(vol, threshold=0.6, defrag=True)
        assert report.windows_defragmented == 4
        assert report.bytes_defragmented == 4 * MiB - 16 * BS   # every block but the zeroed run
        assert report.bytes_rewritten >= report.bytes_defragmented
        after = testing.extent_count(vol)
        print(f"\n[defrag] extents {before} -> {after}")
        assert before > 400 and after <= 8, (before, after)
        assert compact(vol, defrag=True).windows_defragmented == 0, "nothing left to do"
        assert_reads(vol, bytes(model), rng)
        assert vol.allocation(MiB + 8 * BS, 16 * BS)[0].allocated is False, "the hole stays a hole"
    finally:
        vol.close()
    wipe_cache(tmp_path / "cache", store, "v")
    with Volume.open(store, "v", cache_root=str(tmp_path / "cache")) as vol:
        assert_reads(vol, bytes(model), rng)
    assert verify_clean(store, "v", tmp_path / "cache")


def test_defrag_never_overwrites_a_newer_write(tmp_path):
    """A write that lands between planning a window and copying it wins."""
    rng = random.Random(8)
    store, vol, model = _scattered_volume(tmp_path, rng)
    real = vol.map_extents
    newer = b"N" * BS

    def extents_then_a_write(first, n):
        extents = real(first, n)
        vol.write(first * BS + 5 * BS, newer)        # after the plan, before the copy
        model[first * BS + 5 * BS:first * BS + 6 * BS] = newer
        return extents

    vol.map_extents = extents_then_a_write
    try:
        report = compact(vol, defrag=True)
        assert report.windows_defragmented == 4
        assert_reads(vol, bytes(model), rng)
    finally:
        vol.close()
    with Volume.open(store, "v", cache_root=str(tmp_path / "cache")) as vol:
        assert_reads(vol, bytes(model), rng)


def test_compact_defrag_from_the_cli(tmp_path):
    store, vol, model = _scattered_volume(tmp_path, random.Random(9))
    vol.close()
    url = "file://" + str(tmp_path / "store")
    plan = lsbd_json(url, tmp_path / "cache", "compact", "v", "--defrag", "--dry-run")
    assert plan["windows_defragmented"] == 4 and plan["dry_run"] is True
    report = lsbd_json(url, tmp_path / "cache", "compact", "v", "--defrag")
    assert report["windows_defragmented"] == 4
    assert report["bytes_defragmented"] == 4 * MiB - 16 * BS
    text = lsbd(url, tmp_path / "cache", "compact", "v", "--defrag").stdout
    assert "1 MiB ranges defragmented" in text
    with Volume.open(store, "v", cache_root=str(tmp_path / "cache")) as vol:
        assert testing.extent_count(vol) <= 8
        assert_reads(vol, bytes(model))
