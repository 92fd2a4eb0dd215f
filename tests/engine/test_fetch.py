"""Hiding the store's latency on reads (lsbd.segments.fetch, lsbd.engine.readahead): a
reader going in order fetches whole segments and reads ahead; scattered
reads stay small ranged GETs; prefetch and NBD_CMD_CACHE fill the cache."""

from __future__ import annotations

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


def test_segments_fetched_ahead_are_bounded_by_the_cache():
    """Fetches ahead of a reader never take more than a quarter of the
    cache limit (they would push out segments not read yet), and at least
    one segment is fetched ahead."""
    from lsbd.engine.reader import SEGMENTS_AHEAD, segments_ahead

    assert segments_ahead(1 << 30, 32 * MiB) == SEGMENTS_AHEAD == 4
    assert segments_ahead(256 * MiB, 32 * MiB) == 2
    assert segments_ahead(32 * MiB, 32 * MiB) == 1


PIECE = 64 * 1024


def _small_pieces(monkeypatch):
    """Stream in 64 KiB pieces, so a 1 MiB segment is many of them."""
    import lsbd.segments.stream
    import lsbd.store.s3

    monkeypatch.setattr(lsbd.store.s3, "STREAM_PIECE", PIECE)
    monkeypatch.setattr(lsbd.segments.stream, "CHUNK", PIECE)


def _gate_streams(store, monkeypatch, after: int):
    """Make every streamed GET stop after its first `after` bytes until
    `release` is set; `reached` counts the streams stopped there."""
    import threading

    release = threading.Event()
    reached = threading.Semaphore(0)
    get_stream = store.get_stream

    def gated(key):
        size, pieces = get_stream(key)

        def stopping():
            at = 0
            for piece in pieces:
                if at == after:
                    reached.release()
                    assert release.wait(60)
                at += len(piece)
                yield piece
        return size, stopping()

    monkeypatch.setattr(store, "get_stream", gated)
    return release, reached


def _segment_of(vol, lba):
    seq = vol.map_extents(lba, 1)[0].seq
    return seq, sorted(vol.extents_in({seq}), key=lambda e: e.offset)


def test_a_fetch_streams_into_the_cache_dir_holding_only_a_few_pieces(
        written, tmp_path, monkeypatch):
    """A whole-segment fetch never holds the segment: the S3 answer comes
    in pieces, the stream checks and writes them with allocations far below
    the segment's size, and the copy it leaves in the cache dir is right."""
    import tracemalloc

    from lsbd.segments.stream import BlockChecker, open_part, stream_into

    _small_pieces(monkeypatch)
    store, expected = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    try:
        seq, ext = _segment_of(vol, 2 * SEGMENT // BS)
        key = names.segment_key("vol", seq)
        size, pieces = store.get_stream(key)
        pieces = list(pieces)
        assert size > SEGMENT and len(pieces) > 8 and max(map(len, pieces)) <= PIECE
        idx = files._remote_index(seq)
        # The stream's own allocations (the S3 server runs in this process,
        # and the pieces are already here).
        # The least of three runs: another thread may allocate meanwhile.
        peaks = []
        for _ in range(3):
            fd, direct = open_part(str(tmp_path / "seg.part"))
            tracemalloc.start()
            try:
                stream_into(fd, direct, iter(pieces), size, BlockChecker(idx, BS, key),
                            lambda n: None, lambda: False)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
                os.close(fd)
        peak = min(peaks)
        assert peak < 4 * PIECE, f"peak allocation {peak} for a {size}-byte segment"
        with open(tmp_path / "seg.part", "rb") as f:
            assert f.read() == b"".join(pieces)
        files.prefetch(seq).result(30)
        assert os.path.exists(files.path(seq))
        assert not os.path.exists(files.path(seq) + ".part")
        watch = store.fail("get", key_prefix=key, after=10**9)
        for e in ext:
            assert vol.read(e.lba * BS, e.nblocks * BS) == \
                expected[e.lba * BS:(e.lba + e.nblocks) * BS]
        assert watch.seen == 0, "read from the cache dir"
    finally:
        vol.close()


def test_reads_during_a_stream_wait_only_for_their_own_bytes(written, tmp_path, monkeypatch):
    """While a segment streams in, a read of bytes already here is served
    from the .part file, checked, with no GET; a read of bytes still to
    come waits for them (nowait: WouldBlock), and is right once they come."""
    from concurrent.futures import ThreadPoolExecutor

    from lsbd.errors import WouldBlock

    _small_pieces(monkeypatch)
    store, expected = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    release, reached = _gate_streams(store, monkeypatch, SEGMENT // 2)
    try:
        seq, ext = _segment_of(vol, 2 * SEGMENT // BS)
        fut = files.prefetch(seq)
        assert reached.acquire(timeout=30), "the stream reached its middle"
        watch = store.fail("get", key_prefix=names.segment_key("vol", seq), after=10**9)
        early = [e for e in ext if e.offset + e.nblocks * BS <= SEGMENT // 2]
        late = [e for e in ext if e.offset >= SEGMENT // 2 + PIECE]
        assert early and late
        for e in early:
            assert vol.read(e.lba * BS, e.nblocks * BS) == \
                expected[e.lba * BS:(e.lba + e.nblocks) * BS]
        with pytest.raises(WouldBlock):
            vol.read(late[0].lba * BS, BS, nowait=True)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(vol.read, late[0].lba * BS, BS)
            time.sleep(0.3)
            assert not waiting.done(), "a read of bytes still to come waits for them"
            assert not os.path.exists(files.path(seq)), "still streaming"
            release.set()
            assert waiting.result(30) == expected[late[0].lba * BS:(late[0].lba + 1) * BS]
        for e in late:
            assert vol.read(e.lba * BS, e.nblocks * BS) == \
                expected[e.lba * BS:(e.lba + e.nblocks) * BS]
        fut.result(30)
        assert os.path.exists(files.path(seq))
        assert watch.seen == 0, "every read waited for the stream, none asked the store"
    finally:
        release.set()
        vol.close()


def test_a_fetch_damaged_mid_stream_is_caught_and_never_cached(
        written, tmp_path, monkeypatch, caplog):
    """A bit flipped in the middle of a streamed GET: the fetch stops there
    and leaves nothing in the cache dir (no segment file, no .part); reads
    before, during and after it get the right bytes."""
    _small_pieces(monkeypatch)
    store, expected = written
    vol = _reader(store, tmp_path)
    files = testing.local_files(vol)
    release, reached = _gate_streams(store, monkeypatch, SEGMENT // 4)
    try:
        seq, ext = _segment_of(vol, 6 * SEGMENT // BS)
        files._remote_index(seq)     # as the read that starts a fetch brings it
        store.corrupt_next_get(1, key_prefix=names.segment_key("vol", seq))
        fut = files.prefetch(seq)
        assert reached.acquire(timeout=30)
        e = ext[0]
        assert e.offset + BS <= SEGMENT // 4
        assert vol.read(e.lba * BS, BS) == expected[e.lba * BS:(e.lba + 1) * BS]
        release.set()
        fut.result(30)
        assert "failed its check" in caplog.text
        assert not os.path.exists(files.path(seq)), "the damaged copy was not kept"
        assert not os.path.exists(files.path(seq) + ".part")
        assert not files.is_local(seq)
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
    held.add(5, bytes(100))
    assert 3 not in held and 2 in held, "a segment read goes before one not read yet"
    assert held.drop(2) and not held.installed(2), "a segment let go reports it"
    held.clear()
    assert not held and held.nbytes == 0


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
