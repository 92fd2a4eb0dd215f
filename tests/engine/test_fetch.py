"""Hiding the store's latency on reads (lsbd.segments.fetch, lsbd.engine.readahead): a
reader going in order fetches whole segments and reads ahead; scattered
reads stay small ranged GETs; prefetch and NBD_CMD_CACHE fill the cache."""

from __future__ import annotations

import contextlib
import os
import random
import time

import pytest
from engine_helpers import BS, MiB, blocks, open_test_store, read_all
from nbd_helpers import RawClient, running_server

from lsbd import names
from lsbd.engine import testing
from lsbd.meta.config import create_volume
from lsbd.engine.readahead import ReadAhead
from lsbd.engine.volume import Volume
from lsbd.segments.remote import TAIL_READ
from lsbd.store.faulty import FaultyStore
from lsbd.store.local import LocalStore
from lsbd_nbd import protocol as p

SIZE = 32 * MiB
SEGMENT = 1 * MiB


@pytest.fixture
def written(tmp_path, s3_url):
    """A volume written in order, 1 MiB segments, in S3 (moto over HTTP)
    through a wrapper that counts requests; (store, the volume's bytes)."""
    store = FaultyStore(open_test_store(s3_url))
    create_volume(store, "vol", SIZE, segment_size=SEGMENT)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "w"))
    for lba in range(0, SIZE // BS, 64):
        vol.write(lba * BS, blocks(lba, lba, 64))
    expected = read_all(vol)
    vol.close()
    return store, expected


def _reader(store, tmp_path, name="r") -> Volume:
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / name), read_only=True)
    store.reset_counts()
    return vol


def test_reading_in_order_fetches_whole_segments_not_each_read(written, tmp_path):
    store, expected = written
    vol = _reader(store, tmp_path)
    try:
        got = b"".join(vol.read(off, 128 * 1024) for off in range(0, SIZE, 128 * 1024))
        assert got == expected
        reads = SIZE // (128 * 1024)
        segments = SIZE // SEGMENT
        # Without whole fetches and read-ahead: one GET per read (256), plus indexes.
        assert store.calls["get"] <= 2 * segments + 8, store.calls
        assert store.calls["get"] < reads / 2
        assert testing.local_files(vol).fetcher.stats["whole_fetches"] >= segments - 2
    finally:
        vol.close()


def test_scattered_reads_are_small_ranged_gets(written, tmp_path):
    store, expected = written
    vol = _reader(store, tmp_path)
    try:
        rng = random.Random(4)
        # One block from each of a few segments, never twice from one.
        for seg in rng.sample(range(SIZE // SEGMENT), 6):
            off = seg * SEGMENT + rng.randrange(SEGMENT // BS // 2) * BS * 2 + BS
            assert vol.read(off, BS) == expected[off:off + BS]
        assert testing.local_files(vol).fetcher.stats["whole_fetches"] == 0
        assert store.bytes_got < 6 * (BS + TAIL_READ) + TAIL_READ, store.bytes_got
    finally:
        vol.close()


def test_prefetch_fills_the_cache_and_reads_then_stay_local(written, tmp_path):
    store, expected = written
    vol = _reader(store, tmp_path)
    try:
        vol.prefetch(4 * MiB, 8 * MiB)
        store.reset_counts()
        assert vol.read(4 * MiB, 8 * MiB) == expected[4 * MiB:12 * MiB]
        assert store.calls["get"] == 0, store.calls
    finally:
        vol.close()


def test_a_read_of_several_segments_reads_them_in_parallel(written, tmp_path, monkeypatch):
    store, expected = written
    vol = _reader(store, tmp_path)
    seen = set()
    inner_get = store.inner.get

    def get(key, start=0, length=None):
        import threading

        seen.add(threading.current_thread().name)
        return inner_get(key, start, length)

    monkeypatch.setattr(store.inner, "get", get)
    try:
        assert vol.read(3 * MiB + 512 * 1024, 3 * MiB) == expected[3 * MiB + 512 * 1024:
                                                                    6 * MiB + 512 * 1024]
        assert any(name.startswith("lsbd-read") for name in seen), seen
    finally:
        vol.close()


def test_read_ahead_bookkeeping():
    ra = ReadAhead(window=1000)
    assert ra.note(0, 100) == (False, None)
    assert ra.note(100, 100) == (True, (200, 1200))
    assert ra.note(100, 100) == (True, None)          # the same read again (a retry)
    assert ra.note(200, 100) == (True, None)          # well inside the window
    assert ra.note(300, 400) == (True, (1200, 1700))  # within half a window of its end
    assert ra.note(5000, 10) == (False, None)         # a jump starts over


def test_nbd_cache_is_advertised_and_prefetches(written, tmp_path):
    store, expected = written
    vol = _reader(store, tmp_path)
    try:
        with running_server({"vol": vol}, tcp=True) as server:
            c = RawClient(server.connect())
            info = c.connect_export("vol", structured=False)
            assert info["flags"] & p.FLAG_SEND_CACHE
            assert c.call(p.CMD_CACHE, 8 * MiB, 4 * MiB) == (0, b"")
            segments = {e.seq for e in vol.map_extents(8 * MiB // BS, 4 * MiB // BS)}
            assert segments and all(testing.local_files(vol).is_local(s) for s in segments)
            store.reset_counts()
            assert c.call(p.CMD_READ, 8 * MiB, 1 * MiB) == (0, expected[8 * MiB:9 * MiB])
            assert store.calls["get"] == 0
            c.disconnect()
    finally:
        vol.close()


def test_nothing_is_fetched_whole_from_a_local_store(tmp_path):
    store = FaultyStore(LocalStore(str(tmp_path / "store")))
    create_volume(store, "vol", 8 * MiB, segment_size=SEGMENT)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "w"))
    vol.write(0, blocks(1, 0, 8 * MiB // BS))
    expected = read_all(vol)
    vol.close()
    vol = _reader(store, tmp_path)
    try:
        assert read_all(vol) == expected
        assert testing.local_files(vol).fetcher.stats["whole_fetches"] == 0
    finally:
        vol.close()


def test_a_segment_fetched_whole_brings_the_next_ones_when_it_is_read(written, tmp_path):
    """Data written together is read together: the first read of a segment
    fetched whole starts fetches of the next few, and only of those."""
    from lsbd.engine.reader import SEGMENTS_AHEAD

    store, expected = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    try:
        first = vol.map_extents(5 * SEGMENT // BS, 1)[0].seq + 1
        lbas = sorted(lba for e in vol.extents_in({first}) for lba in range(e.lba, e.lba + e.nblocks))
        for lba in (lbas[40], lbas[10], lbas[100]):   # three blocks of it, not in order
            assert vol.read(lba * BS, BS) == expected[lba * BS:(lba + 1) * BS]
        nxt = range(first + 1, first + 1 + SEGMENTS_AHEAD)
        deadline = time.monotonic() + 30
        while not all(map(files.is_local, nxt)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(map(files.is_local, nxt)), [files.is_local(s) for s in nxt]
        assert not files.is_local(first + SEGMENTS_AHEAD + 2)
        # its own first read chains fetches further on, so watch only its key
        watch = store.fail("get", key_prefix=names.segment_key("vol", first + 2), after=10**9)
        e = vol.extents_in({first + 2})[0]
        assert vol.read(e.lba * BS, BS) == expected[e.lba * BS:(e.lba + 1) * BS]
        assert watch.seen == 0
    finally:
        vol.close()


def test_a_writer_on_a_new_cache_dir_fetches_the_volumes_first_blocks_at_open(written, tmp_path):
    """A cache dir rebuilt from the store holds no data: the open starts
    whole fetches of the segments holding the volume's first blocks (what a
    file system's mount reads first), those of the lowest blocks first, at
    most segments_ahead() of them, before any read asks; as read-ahead, so
    that reading them fetches the next ones."""
    from lsbd.engine.reader import segments_ahead

    store, expected = written
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "w2"))
    vol.write(0, blocks(7, 0, 1))    # the first block written last, as a superblock is
    vol.close()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "w3"))
    files = testing.local_files(vol)
    try:
        order: list[int] = []
        for e in vol.map_extents(0, SIZE // BS):
            if e.seq not in order:
                order.append(e.seq)
        limit = segments_ahead(files.cache_limit, SEGMENT)
        assert 1 < limit < len(order)
        want = order[:limit]
        assert want[0] == vol.applied_seq           # block 0's segment, the newest
        assert files.fetcher.stats["whole_fetches"] == limit
        deadline = time.monotonic() + 30
        while not all(map(files.is_local, want)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [s for s in order if files.is_local(s)] == want
        # their reads fetch the next segments (read-ahead), so watch only their keys
        watches = [store.fail("get", key_prefix=names.segment_key("vol", s), after=10**9)
                   for s in want[:2]]
        assert vol.read(BS, BS) == expected[BS:2 * BS]
        assert vol.read(0, BS) == blocks(7, 0, 1)
        assert [w.seen for w in watches] == [0, 0]
        # as read-ahead: the first read of one fetches the segments after it
        after = max(want[1:]) + 1
        assert after not in want
        deadline = time.monotonic() + 30
        while not files.is_local(after) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert files.is_local(after)
    finally:
        vol.close()


def test_segments_fetched_ahead_are_bounded_by_the_cache():
    """Fetches ahead of a reader never take more than a quarter of the
    cache limit (they would push out segments not read yet), and at least
    one segment is fetched ahead."""
    from lsbd.engine.reader import SEGMENTS_AHEAD, segments_ahead

    assert segments_ahead(1 << 30, 32 * MiB) == SEGMENTS_AHEAD == 4
    assert segments_ahead(256 * MiB, 32 * MiB) == 2
    assert segments_ahead(32 * MiB, 32 * MiB) == 1


def _hold_installs(files, monkeypatch):
    """Make every install of a fetched segment into the cache dir wait for
    `release`; `writing` counts the installs waiting."""
    import threading

    release = threading.Event()
    writing = threading.Semaphore(0)
    install = files._install

    def held(seq, data):
        writing.release()
        assert release.wait(60)
        install(seq, data)

    monkeypatch.setattr(files, "_install", held)
    return release, writing


def test_a_read_is_served_from_the_fetched_bytes_before_they_are_in_the_cache_dir(
        written, tmp_path, monkeypatch):
    """Writing a fetched segment into the cache dir can be slow (new
    page-cache pages on a virtual machine): readers never wait for it."""
    store, expected = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    release, writing = _hold_installs(files, monkeypatch)
    try:
        seq = vol.map_extents(2 * SEGMENT // BS, 1)[0].seq
        fut = files.prefetch(seq)
        assert writing.acquire(timeout=30), "the fetch reached its install"
        ext = vol.extents_in({seq})
        watch = store.fail("get", key_prefix=names.segment_key("vol", seq), after=10**9)
        for e in ext:       # every block of it, from memory, checked, no GET of it
            got = vol.read(e.lba * BS, e.nblocks * BS, nowait=True)
            assert got == expected[e.lba * BS:(e.lba + e.nblocks) * BS]
        assert watch.seen == 0
        assert not os.path.exists(files.path(seq)), "the install is still held"
        release.set()
        fut.result(30)
        assert os.path.exists(files.path(seq))
        assert vol.read(ext[0].lba * BS, BS, nowait=True) == \
            expected[ext[0].lba * BS:(ext[0].lba + 1) * BS]
        assert watch.seen == 0
    finally:
        release.set()
        vol.close()


def _fetched_and_let_go(vol, files) -> int:
    """The seq of a segment fetched whole into the cache dir, then let go
    from memory (held no more): its reads go to the copy."""
    seq = vol.map_extents(2 * SEGMENT // BS, 1)[0].seq
    files.prefetch(seq).result(30)
    assert files.held.drop(seq), "held until let go"
    return seq


def test_a_fetched_copy_stays_in_the_page_cache_once_let_go_from_memory(written, tmp_path):
    """A cold read of a whole tree reads segments fetched before their
    reader got there (guesses, let go from memory meanwhile) from their
    copies: the copy is written through the page cache, so those reads wait
    for no disk (a read that may not wait, nowait, is served)."""
    store, expected = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    try:
        seq = _fetched_and_let_go(vol, files)
        assert os.path.exists(files.path(seq))
        watch = store.fail("get", key_prefix=names.segment_key("vol", seq), after=10**9)
        for e in vol.extents_in({seq}):
            got = vol.read(e.lba * BS, e.nblocks * BS, nowait=True)
            assert got == expected[e.lba * BS:(e.lba + e.nblocks) * BS]
        assert watch.seen == 0
    finally:
        vol.close()


def test_a_fetched_copy_is_private_to_its_owner_as_a_journal_is(written, tmp_path):
    """A plain volume's cache dir holds its blocks in the clear: a segment
    fetched into it is readable by its owner only, as the segments the
    volume writes there are."""
    store, _ = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    try:
        seq = _fetched_and_let_go(vol, files)
        assert os.stat(files.path(seq)).st_mode & 0o777 == 0o600
    finally:
        vol.close()


def test_fetched_bytes_held_in_memory_are_bounded(written, tmp_path, monkeypatch):
    """However many segments are asked for, at most one per fetch in flight
    is held in memory while its copy is written, and no more than the limit
    (a quarter of the cache limit here) once the copies are in place,
    beyond the one read last."""
    from lsbd.segments.fetch import FETCH_WORKERS

    store, expected = written
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "r"), read_only=True,
                      cache_limit=16 * SEGMENT)
    files = testing.local_files(vol)
    assert files.held.limit == 4 * SEGMENT
    release, writing = _hold_installs(files, monkeypatch)
    seqs = sorted({e.seq for e in vol.extents()})
    largest = max(store.head(names.segment_key("vol", s)) for s in seqs)
    try:
        futures = [files.prefetch(s) for s in seqs]
        assert len(futures) > 2 * FETCH_WORKERS
        for _ in range(FETCH_WORKERS):
            assert writing.acquire(timeout=30)
        assert not writing.acquire(timeout=0.5), "no more fetches got their bytes"
        assert files.held.nbytes <= FETCH_WORKERS * largest
        release.set()
        for f in futures:
            f.result(60)
        assert 0 < files.held.nbytes <= files.held.limit
        assert read_all(vol) == expected
        assert files.held.nbytes <= files.held.limit + largest
    finally:
        release.set()
        vol.close()


def test_a_damaged_fetch_is_caught_and_never_cached(written, tmp_path, monkeypatch, caplog):
    """A bit flipped in a whole-segment GET: the read that meets it reads
    the store's copy again and gets the right bytes, and the damaged copy
    does not stay in the cache dir."""
    store, expected = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    release, writing = _hold_installs(files, monkeypatch)
    try:
        seq = vol.map_extents(6 * SEGMENT // BS, 1)[0].seq
        store.corrupt_next_get(1, key_prefix=names.segment_key("vol", seq))
        fut = files.prefetch(seq)
        assert writing.acquire(timeout=30)
        ext = vol.extents_in({seq})
        for e in ext:
            got = vol.read(e.lba * BS, e.nblocks * BS)
            assert got == expected[e.lba * BS:(e.lba + e.nblocks) * BS]
        assert "failed its check" in caplog.text
        release.set()
        fut.result(30)
        assert not os.path.exists(files.path(seq)), "the damaged copy was not kept"
        assert seq not in files.held
        assert read_all(vol) == expected
    finally:
        release.set()
        vol.close()


def test_held_segments_let_go_of_read_ones_first_never_of_one_being_written():
    from lsbd.segments.held import HeldSegments

    held = HeldSegments(limit=300)
    for seq in (1, 2, 3):
        held.add(seq, bytes(100))
    held.add(4, bytes(100))                  # over the limit, none in the cache dir yet
    assert held.nbytes == 400 and all(s in held for s in (1, 2, 3, 4))
    for seq in (1, 2, 3):
        assert held.installed(seq)
    assert 1 not in held and held.nbytes == 300      # the oldest in the cache dir
    assert held.get(3) is not None                   # 3 read, 2 not yet
    assert held.installed(4) and held.nbytes == 300
    assert held.get(4) is not None                   # read last: a reader is in it
    held.add(5, bytes(100))
    assert held.nbytes == 400, "the segment read last counts for nothing"
    held.add(6, bytes(100))
    assert 3 not in held and 2 in held, "a segment read goes before one not read yet"
    assert held.drop(2) and not held.installed(2), "a segment let go reports it"
    held.clear()
    assert not held and held.nbytes == 0


def test_held_segments_keep_what_a_reader_going_in_order_reaches_next():
    """Beyond the segment read last (a reader is in it), held segments are
    let go in this order: those read, those fetched for no reader or that
    the reader has gone past, then those ahead of it, the furthest first.
    ahead_bytes counts what is held ahead of the reader; reaching a segment,
    or letting one go, makes room for read-ahead."""
    from lsbd.segments.held import HeldSegments

    held = HeldSegments(limit=300)
    rooms: list[int] = []
    held.on_room = lambda: rooms.append(held.reached)

    def fetched(seq, read_ahead=True):
        held.add(seq, bytes(100), read_ahead=read_ahead)
        assert held.installed(seq)

    for seq in (1, 2, 3):
        fetched(seq)
    assert held.ahead_bytes() == 300 and held.segment_bytes == 100 and rooms == []
    assert held.get(1) is not None and held.reached == 1 and rooms == [1]
    assert held.get(1) is not None and rooms == [1], "only a first read moves the reader"
    assert held.get(2) is not None and held.reached == 2 and held.ahead_bytes() == 100
    fetched(9, read_ahead=False)             # for no reader (a prefetch named it)
    assert held.nbytes == 400 and 2 in held, "the segment read last counts for nothing"
    fetched(4)
    assert 1 not in held and all(s in held for s in (2, 3, 4, 9)), "a read one first"
    assert len(rooms) == 3, "letting go makes room"
    fetched(5)
    assert 9 not in held and all(s in held for s in (2, 3, 4, 5)), "then one for no reader"
    assert held.get(4) is not None and held.ahead_bytes() == 100    # 3 is gone past
    fetched(6)
    assert 2 not in held and 3 in held                  # a read one first again
    fetched(7)
    assert 3 not in held, "then one the reader has gone past"
    assert held.ahead_bytes() == 300                    # 5, 6, 7
    fetched(8)
    assert 8 not in held and all(s in held for s in (4, 5, 6, 7)), \
        "then the furthest ahead of the reader, never the next one"
    assert held.nbytes - 100 <= held.limit


def test_held_segments_in_the_cache_dir_are_let_go_once_idle():
    """A reader that has moved on leaves nothing held for long: a segment in
    the cache dir and unused for `idle` seconds is let go, without another
    call (the tail of a read); one still being written is kept."""
    from lsbd.segments.held import HeldSegments

    held = HeldSegments(limit=1 << 20, idle=0.2)
    held.add(1, bytes(100))
    held.add(2, bytes(100))
    assert held.installed(1)
    assert held.get(1) is not None
    deadline = time.monotonic() + 10
    while 1 in held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 1 not in held and 2 in held and held.nbytes == 100


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_cold_read_of_a_segment_queued_behind_read_ahead_does_not_wait_for_it(
        written, tmp_path, monkeypatch):
    """The first read of a segment fetched whole starts fetches of the next
    few (read-ahead); a read of the last of them, still queued behind the
    others, is served while the others' GETs are still running (here they
    end only once it is done)."""
    import threading

    from lsbd.engine.reader import SEGMENTS_AHEAD
    from lsbd.segments.fetch import FETCH_WORKERS

    store, expected = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    release = threading.Event()
    try:
        first = vol.map_extents(5 * SEGMENT // BS, 1)[0].seq + 1
        hanging = tuple(names.segment_key("vol", s) for s in range(first + 1, first + 1 + FETCH_WORKERS))
        get = store.get
        stuck = threading.Semaphore(0)

        def slow_get(key, start=0, length=None):
            if length is None and key.startswith(hanging):   # a whole GET of a guess
                stuck.release()
                release.wait(60)
            return get(key, start, length)

        monkeypatch.setattr(store, "get", slow_get)
        lbas = sorted(lba for e in vol.extents_in({first}) for lba in range(e.lba, e.lba + e.nblocks))
        for lba in (lbas[40], lbas[10], lbas[100]):   # fetched whole, then read: read-ahead
            assert vol.read(lba * BS, BS) == expected[lba * BS:(lba + 1) * BS]
        for _ in hanging:       # every fetch worker is in a guess's GET
            assert stuck.acquire(timeout=30)
        last = first + SEGMENTS_AHEAD     # queued behind them
        e = vol.extents_in({last})[0]
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(vol.read(e.lba * BS, BS)))
        reader.start()
        reader.join(20)
        assert not reader.is_alive(), "the read waited behind the read-ahead's GETs"
        assert got == [expected[e.lba * BS:(e.lba + 1) * BS]]
        assert files.fetcher.stats["for_reads"] == 1
        assert not files.is_local(first + 1) and not files.is_local(first + 2)   # still hanging
    finally:
        release.set()
        vol.close()


@contextlib.contextmanager
def _held_fetcher(room=None):
    """A Fetcher whose fetch of seq (0-9) records its start and then waits
    for release[seq]: the test decides when each fetch ends.  room: see
    Fetcher.  On the way out every fetch is let go and the fetcher closed."""
    import threading

    from lsbd.segments.fetch import Fetcher

    started: list[int] = []
    release = {seq: threading.Event() for seq in range(10)}

    def fetch_whole(seq, ready):
        started.append(seq)
        release[seq].wait(30)
        ready()

    fetcher = Fetcher(fetch_whole, room=room)
    try:
        yield fetcher, started, release
    finally:
        _finish(release)
        fetcher.close()


def _finish(release, futures=()) -> None:
    """Lets every held fetch end, then waits for `futures`."""
    for e in release.values():
        e.set()
    for f in futures:
        f.result(30)


def test_a_read_never_waits_behind_read_ahead():
    """Both workers busy with read-ahead guesses, three more guesses queued:
    a read that needs the last one gets it at once, while the guesses still
    run, and the guesses queued keep their order (the small files' segments
    are not pushed back)."""
    import threading

    from lsbd.segments.fetch import FETCH_WORKERS

    with _held_fetcher() as (fetcher, started, release):
        guesses = [fetcher.prefetch(seq, mark=True) for seq in range(FETCH_WORKERS)]
        _until(lambda: len(started) == FETCH_WORKERS, "every worker is fetching")
        queued = [fetcher.prefetch(seq, mark=True) for seq in (5, 6, 7)]
        release[7].set()
        waiter = threading.Thread(target=fetcher.wait_if_fetching, args=(7,))
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), f"the read waited behind the guesses: {started}"
        assert started == [0, 1, 7]
        assert fetcher.stats["for_reads"] == 1
        release[0].set()        # a worker is free: the next guess, in order
        _until(lambda: len(started) == 4, "the next guess starts")
        assert started[3] == 5
        _finish(release, guesses + queued)
        assert started == [0, 1, 7, 5, 6]


def test_while_a_read_waits_for_a_fetch_at_most_one_guess_shares_the_store_with_it():
    """A read waits for a fetch: a worker that comes free starts no second
    guess beside the one under way until the read's bytes are here."""
    import threading

    from lsbd.segments.fetch import FETCH_WORKERS

    with _held_fetcher() as (fetcher, started, release):
        guesses = [fetcher.prefetch(seq, mark=True) for seq in range(FETCH_WORKERS)]
        _until(lambda: len(started) == FETCH_WORKERS, "every worker is fetching")
        queued = [fetcher.prefetch(seq, mark=True) for seq in (5, 6, 7)]
        waiter = threading.Thread(target=fetcher.wait_if_fetching, args=(7,))
        waiter.start()
        _until(lambda: len(started) == FETCH_WORKERS + 1, "the read's fetch starts")
        release[0].set()        # a worker is free, a guess (1) still under way
        _until(lambda: fetcher.stats["held_back"] >= 1, "the worker looks at the queue")
        assert started == [0, 1, 7], "a second guess started beside the read's fetch"
        release[7].set()        # the read's bytes are here: the guesses go on, in order
        _until(lambda: len(started) == 4, "the next guess starts")
        assert started[3] == 5
        waiter.join(30)
        _finish(release, guesses + queued)
        assert started == [0, 1, 7, 5, 6]


def test_reads_waiting_for_queued_fetches_go_ahead_of_read_ahead_in_turn():
    """Every worker busy, the one kept for reads too: fetches reads wait
    for run next, in the order the reads came, before the guesses queued."""
    import threading

    from lsbd.segments.fetch import FETCH_WORKERS

    waiters = []
    with _held_fetcher() as (fetcher, started, release):
        busy = [fetcher.prefetch(seq) for seq in range(FETCH_WORKERS)]
        _until(lambda: len(started) == FETCH_WORKERS, "every worker is fetching")
        queued = [fetcher.prefetch(seq, mark=True) for seq in (3, 5, 6, 7)]
        for seq in (3, 7, 6):
            waiters.append(threading.Thread(target=fetcher.wait_if_fetching, args=(seq,)))
            waiters[-1].start()
            if seq == 3:        # the worker kept for reads takes it, and is busy
                _until(lambda: len(started) == FETCH_WORKERS + 1, "3 starts at once")
            else:
                _until(lambda: fetcher.stats["waited"] == len(waiters), "the read waits")
        assert started == [0, 1, 3]
        assert fetcher.stats["moved_ahead"] == 2
        release[0].set()
        _until(lambda: len(started) == 4, "a worker takes the next")
        assert started[3] == 7
        release[3].set()
        _until(lambda: len(started) == 5, "a worker takes the next")
        assert started[4] == 6
        release[6].set()        # the worker kept for reads is free; no read waits now
        fetcher._demand.submit(lambda: None).result(30)   # its jobs queued before are done
        assert started == [0, 1, 3, 7, 6], "a guess ran on the worker kept for reads"
        _finish(release, busy + queued)
        for w in waiters:
            w.join(30)
            assert not w.is_alive()
        assert started == [0, 1, 3, 7, 6, 5]


def test_read_ahead_waits_for_room_ahead_of_the_reader():
    """A fetch read ahead starts only while room() says there is room ahead
    of the reader (here: one segment, fetched or in flight), even with a
    worker free; the reader reaching a segment makes room.  A fetch a caller
    named, and one a read waits for, start without room."""
    import threading

    ahead = [0]         # segments fetched ahead, not read yet

    def room(in_flight):
        return ahead[0] + in_flight < 1

    with _held_fetcher(room) as (fetcher, started, release):
        guesses = [fetcher.prefetch(seq, mark=True) for seq in (0, 1, 2)]
        _until(lambda: started and fetcher.stats["no_room"] >= 1, "a worker finds no room")
        assert started == [0]
        named = fetcher.prefetch(7)
        _until(lambda: len(started) == 2, "the fetch named starts")
        assert started == [0, 7]
        ahead[0] = 1            # 0's bytes are held, not read yet
        release[0].set()
        release[7].set()
        _until(lambda: fetcher.stats["no_room"] >= 3, "the workers look again")
        assert started == [0, 7], "read-ahead went further than there was room for"
        ahead[0] = 0            # the reader reached 0
        fetcher.room_made()
        _until(lambda: len(started) == 3, "the next one read ahead starts")
        assert started[2] == 1
        release[2].set()        # a read needs 2, still no room: it starts at once
        waiter = threading.Thread(target=fetcher.wait_if_fetching, args=(2,))
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "the read waited for room ahead of the reader"
        assert started == [0, 7, 1, 2]
        _finish(release, guesses + [named])


def test_a_slow_reader_in_order_reads_every_segment_fetched_ahead_from_memory(
        written, tmp_path, monkeypatch):
    """Read-ahead goes no further ahead of a reader than what is held for
    it: a reader slower than the fetches (it waits for them to stop after
    each segment's worth) finds every segment fetched ahead still held.
    Fetched further ahead, the ones it had not reached yet were let go
    unread, and read back from the cache dir."""
    store, expected = written
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "r"), read_only=True,
                      cache_limit=16 * SEGMENT)
    files = testing.local_files(vol)
    held, fetcher = files.held, files.fetcher
    assert held.limit == 4 * SEGMENT
    let_go_unread: list[int] = []
    drop = held._drop_locked

    def watched_drop(seq):
        entry = held._held.get(seq)
        if entry is not None and not entry.read:
            let_go_unread.append(seq)
        return drop(seq)

    from_memory: set[int] = set()
    get = held.get

    def watched_get(seq):
        data = get(seq)
        if data is not None:
            from_memory.add(seq)
        return data

    monkeypatch.setattr(held, "_drop_locked", watched_drop)
    monkeypatch.setattr(held, "get", watched_get)

    def fetching():
        return any(not e.queued for e in list(fetcher._inflight.values()))

    step = 128 * 1024
    try:
        got = []
        for off in range(0, SIZE, step):
            got.append(vol.read(off, step))
            if (off + step) % SEGMENT == 0:     # about a segment read: the fetches catch up
                time.sleep(0.05)
                _until(lambda: not fetching(), "the fetches stop")
        assert b"".join(got) == expected
        assert let_go_unread == [], "segments fetched ahead were let go before the reader came"
        assert fetcher.stats["no_room"] > 0
        seqs = {e.seq for e in vol.extents()}
        assert len(seqs) > 3 * 4 and seqs <= from_memory, sorted(seqs - from_memory)
    finally:
        vol.close()


def test_fetches_still_queued_at_close_are_cancelled_and_release_their_waiters():
    import threading
    from concurrent.futures import CancelledError

    from lsbd.segments.fetch import FETCH_WORKERS, Fetcher

    release = threading.Event()
    started = threading.Semaphore(0)

    def fetch_whole(seq, ready):
        started.release()
        release.wait(30)

    fetcher = Fetcher(fetch_whole)
    busy = [fetcher.prefetch(seq) for seq in range(FETCH_WORKERS)]
    for _ in busy:
        assert started.acquire(timeout=30)
    busy.append(fetcher.prefetch(8))
    threading.Thread(target=fetcher.wait_if_fetching, args=(8,), daemon=True).start()
    # every worker has taken its fetch, the one kept for reads too: the
    # next one stays queued
    assert started.acquire(timeout=30)
    queued = fetcher.prefetch(9)
    waiter = threading.Thread(target=fetcher.wait_if_fetching, args=(9,))
    waiter.start()
    _until(lambda: fetcher.stats["waited"] == 2, "the read waits")
    fetcher.close()
    waiter.join(10)
    assert not waiter.is_alive()
    with pytest.raises(CancelledError):
        queued.result(10)
    release.set()
    for f in busy:
        assert f.result(30) is None
