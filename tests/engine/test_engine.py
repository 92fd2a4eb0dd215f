"""Unit tests of the engine API (lsbd.engine.volume.Volume) and of its pure
pieces: recovery planning, checksums and the segment format."""

from __future__ import annotations

import errno
import inspect
import os
import random
import struct
import threading
import uuid

import pytest
from engine_helpers import (
    BS,
    MiB,
    block,
    blocks,
    read_from_store,
    segment_seqs,
    wipe,
)

from lsbd import names
from lsbd.checksum import crc32c, crc32c_reference, mask, masked_crc, unmask
from lsbd.engine import sealer as sealer_mod
from lsbd.engine.api import MAX_REQUEST, Allocation
from lsbd.meta.config import create_volume
from lsbd.segments import openfile
from lsbd.segments.journal import OpenSegment
from lsbd.plans.replay import ReplayPlan, plan_replay
from lsbd.engine.recovery import recover_journal_file
from lsbd.format.segment import (
    DATA,
    FLAG_COMMIT,
    HEADER,
    RECORD,
    TRAILER,
    TRIM,
    ZERO,
    Record,
    SegmentIndex,
    Trailer,
    block_crcs,
    decode_footer,
    decode_header,
    decode_one_block_footer,
    decode_trailer,
    index_of_footer,
    encode_footer,
    encode_header,
    encode_record,
    encode_trailer,
    one_block_record_holds,
    ONE_BLOCK_HEAD,
    read_sealed_index,
    scan_records,
)
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.names import cache_dir_for
from lsbd.errors import CorruptionError, InvalidRequest, ReadOnlyError, StoreError, WouldBlock
from lsbd.store import Store
from lsbd.store.faulty import FaultyStore
from lsbd.store.local import LocalStore

SIZE = 64 * MiB


_REOPENED: list[Volume] = []


@pytest.fixture(autouse=True)
def _close_reopened():
    """Close what _reopen opened, as make_volume does for its volumes: a
    volume left open keeps its threads (and the store's) busy after the test."""
    yield
    while _REOPENED:
        try:
            _REOPENED.pop().close()
        except Exception as e:  # noqa: BLE001 - cleanup; the test already reported
            print(f"closing a reopened volume after the test failed: {e}")


def _reopen(vol, tmp_path, *, lose_cache=False, **kw) -> Volume:
    store = vol.store
    vol.close()
    if lose_cache:
        wipe(cache_dir_for(str(tmp_path / "cache"), store, "vol"))
    reopened = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), **kw)
    _REOPENED.append(reopened)
    return reopened


# --- reads and writes ------------------------------------------------------------------


def test_nowait_calls_never_wait_for_the_store(make_volume, tmp_path, in_page_cache):
    """nowait=True: done from local files, or WouldBlock having done nothing."""
    vol = make_volume()
    vol.write(0, blocks(1, 0, 4))
    vol = _reopen(vol, tmp_path, lose_cache=True)   # every segment is in the store only
    with pytest.raises(WouldBlock):
        vol.read(0, BS, nowait=True)
    with pytest.raises(WouldBlock):                 # its edge block would come from the store
        vol.write(100, b"x" * 10, nowait=True)
    with pytest.raises(WouldBlock):
        vol.write_zeroes(BS + 1, 10, nowait=True)
    with pytest.raises(WouldBlock):                 # FUA waits for an fsync
        vol.write(8 * BS, blocks(2, 8, 1), fua=True, nowait=True)
    assert vol.read(0, 4 * BS) == blocks(1, 0, 4), "a refused call changed nothing"
    assert vol.read(8 * BS, BS) == bytes(BS)
    # Whole blocks need nothing from the store; the journal and local copies
    # (the blocks just fetched stay remote: a ranged GET caches nothing) are local.
    vol.write(8 * BS, blocks(3, 8, 2), nowait=True)
    assert vol.read(8 * BS, 2 * BS, nowait=True) == blocks(3, 8, 2)
    vol.write(8 * BS + 5, b"y" * 10, nowait=True)   # edge block in the journal
    assert vol.read(8 * BS, 2, nowait=True) == blocks(3, 8, 1)[:2]
    assert vol.read(20 * BS, BS, nowait=True) == bytes(BS)  # a hole is local too
    vol.flush()
    sealed = testing.seal_now(vol)                   # sealed: a local copy, read through the map
    in_page_cache(testing.local_path(vol, sealed))
    assert vol.read(8 * BS + 5, 10, nowait=True) == b"y" * 10
    with pytest.raises(WouldBlock):
        vol.read(0, 9 * BS, nowait=True)            # partly remote is remote
    assert vol.read(0, BS) == blocks(1, 0, 1)       # without nowait: fetched


def test_nowait_reads_of_cold_local_blocks_would_block(make_volume, monkeypatch, in_page_cache):
    """A local block that is not in the page cache would wait for the disk:
    nowait reads ask the kernel for cached data only (RWF_NOWAIT), return
    what it gives, and pass the read on as WouldBlock when it has none.
    The segment's pages are held in the page cache for the cached read (a
    benchmark beside the suite may drop it at any moment), and the kernel's
    answer for a cold page is a double."""
    vol = make_volume()
    vol.write(0, blocks(1, 0, 4))
    seq = testing.seal_now(vol)
    in_page_cache(testing.local_path(vol, seq))
    cold = False
    asked: list[bool] = []      # each cached-only read, and whether it met a cold page
    real_preadv = os.preadv
    reader = threading.get_ident()   # not the background threads' reads

    def preadv(fd, buffers, offset, flags=0):
        if flags & os.RWF_NOWAIT and threading.get_ident() == reader:
            asked.append(cold)
            if cold:
                raise BlockingIOError(errno.EAGAIN, "would block")   # as for a cold page
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(openfile, "_RWF_NOWAIT", os.RWF_NOWAIT)   # whatever a file system before said
    monkeypatch.setattr(os, "preadv", preadv)
    assert vol.read(0, 4 * BS, nowait=True) == blocks(1, 0, 4)   # cached: done here
    assert asked == [False], "the nowait read asked the kernel for cached data only"
    cold = True
    with pytest.raises(WouldBlock):
        vol.read(0, BS, nowait=True)
    assert asked == [False, True]
    assert vol.read(0, 4 * BS) == blocks(1, 0, 4)             # without nowait: read from disk
    assert asked == [False, True], "a read that may wait asks for no cached-only read"


def _cached_fraction(path: str) -> float:
    """How much of a file a page-cache-only read (RWF_NOWAIT) gets."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(size)
        try:
            return os.preadv(fd, [buf], 0, os.RWF_NOWAIT) / size
        except BlockingIOError:
            return 0.0
    finally:
        os.close(fd)


def test_segments_left_without_live_blocks_leave_the_page_cache(make_volume, monkeypatch):
    """Once every block of a segment is overwritten, nothing reads it (short
    of a restore of the past): the sealer lets the kernel drop its pages, so
    that new writes reuse them.  A segment still holding live blocks keeps
    its pages; the dropped one is still whole on disk.  What the sealer asks
    is noted (a benchmark beside the suite may drop the whole page cache at
    any moment, so only the dropped segment's pages are looked at)."""
    dropped: list[str] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    vol = make_volume()
    vol.write(0, blocks(1, 0, 40))
    first = testing.seal_now(vol)
    vol.write(40 * BS, blocks(2, 40, 40))
    second = testing.seal_now(vol)
    old = {n: os.path.realpath(testing.local_path(vol, seq))
           for n, seq in ((1, first), (2, second))}
    vol.write(0, blocks(3, 0, 70))          # all of segment 1, part of segment 2
    testing.seal_now(vol)
    infos = {i.seq: i for i in vol.segment_infos()}
    assert infos[first].live_blocks == 0 and infos[second].live_blocks == 10
    assert old[1] in dropped, "the empty segment's pages were let go"
    assert old[2] not in dropped, "a segment with live blocks keeps its pages"
    assert _cached_fraction(old[1]) < 0.5, "the kernel dropped them (synced: clean pages)"
    assert vol.read(0, 80 * BS) == blocks(3, 0, 70) + blocks(2, 70, 10)
    vol.flush_to_store()
    assert vol.verify() == []               # every segment, the dropped one included, reads back


def test_reads_see_segments_the_sealer_has_not_recorded_yet(make_volume, in_page_cache):
    """Between sealing and the map update, a segment's blocks are read
    through its in-memory index, newest copy first, holes included."""
    vol = make_volume(segment_size=256 * 1024)
    testing.pause_sealer(vol)   # sealed segments stay queued: never synced or mapped
    vol.write(0, blocks(1, 0, 8))
    testing.seal_queued(vol)
    vol.write(2 * BS, blocks(2, 2, 2))
    vol.trim(4 * BS, BS)
    testing.seal_queued(vol)
    vol.write(3 * BS, blocks(3, 3, 1))     # the open segment
    assert len(testing.sealing(vol)) == 2 and testing.extent_count(vol) == 0
    expect = blocks(1, 0, 2) + blocks(2, 2, 1) + blocks(3, 3, 1) + bytes(BS) + blocks(1, 5, 3)
    assert vol.read(0, 8 * BS) == expect
    in_page_cache(*(testing.local_path(vol, seg.seq)
                    for seg in [*testing.sealing(vol), testing.journal(vol)]))
    assert vol.read(0, 8 * BS, nowait=True) == expect
    vol.flush()                            # syncs the queued journals itself
    assert all(not seg.dirty for seg in testing.sealing(vol))
    vol.abandon()


def test_stats_count_the_sealers_map_commits(make_volume):
    """`lsbd stats` tells what the map costs the sealer: segments it
    recorded, and the seconds (wall and its thread's CPU) that took; and
    the seconds checkpoints took."""
    vol = make_volume(segment_size=256 * 1024)
    before = vol.usage()
    assert before["segments_mapped"] == 0 and before["map_seconds"] == 0
    for seg in range(3):
        vol.write(0, blocks(seg, 0, 8))
        vol.flush_to_store()
    after = vol.usage()
    assert after["segments_mapped"] == after["segments_sealed"] == 3
    assert after["map_seconds"] > 0
    assert 0 < after["map_cpu_seconds"] < after["map_seconds"] + 1
    # And what checkpoints cost the serving process.
    assert after["checkpoint_seconds"] == after["checkpoint_cpu_seconds"] == 0
    vol.checkpoint()
    done = vol.usage()
    assert done["checkpoints"] == 1
    assert 0 < done["checkpoint_cpu_seconds"] < done["checkpoint_seconds"] + 1
    vol.close()


def test_unaligned_io_matches_a_byte_model(make_volume, tmp_path):
    """Random unaligned writes, zeroes, trims and reads against a bytearray."""
    vol = make_volume(segment_size=256 * 1024)
    span = 3 * MiB
    model = bytearray(span)
    rng = random.Random(5)
    for step in range(400):
        off = rng.randrange(0, span - 1)
        length = min(span - off, rng.choice([1, 7, 100, 4095, 4096, 4097, 9000, 70000]))
        r = rng.random()
        if r < 0.6:
            data = rng.randbytes(length)
            vol.write(off, data)
            model[off:off + length] = data
        elif r < 0.7:
            vol.write_zeroes(off, length)
            model[off:off + length] = bytes(length)
        elif r < 0.8:
            vol.trim(off, length)
            model[off:off + length] = bytes(length)
        else:
            assert vol.read(off, length) == model[off:off + length], f"step {step}"
        if step % 50 == 0:
            vol.flush()
    assert vol.read(0, span) == model
    vol = _reopen(vol, tmp_path)
    assert vol.read(0, span) == model
    vol = _reopen(vol, tmp_path, lose_cache=True)
    try:
        assert vol.read(0, span) == model
        assert vol.read(span, 1 * MiB) == bytes(1 * MiB)
    finally:
        vol.close()


def test_partial_block_write_is_a_read_modify_write(make_volume, tmp_path):
    vol = make_volume()
    vol.write(0, block(1, 0) + block(1, 1))
    vol.flush()
    vol = _reopen(vol, tmp_path, lose_cache=True)  # the old blocks come from the store
    try:
        vol.write(BS - 3, b"abcdef")
        expect = bytearray(block(1, 0) + block(1, 1))
        expect[BS - 3:BS + 3] = b"abcdef"
        assert vol.read(0, 2 * BS) == expect
        assert vol.read(BS - 5, 10) == expect[BS - 5:BS + 5]
        vol.write(2 * BS + 1, b"x")  # inside a hole
        assert vol.read(2 * BS, BS) == b"\0x" + bytes(BS - 2)
        assert vol.allocation(2 * BS, BS) == [Allocation(2 * BS, BS, True)]
    finally:
        vol.close()


def test_all_zero_writes_become_holes(make_volume):
    vol = make_volume()
    vol.write(0, bytes(3 * BS))
    assert vol.allocation(0, 4 * BS) == [Allocation(0, 4 * BS, False)]
    vol.write(0, block(1, 0) + bytes(BS) + block(1, 2))
    assert vol.allocation(0, 4 * BS) == [Allocation(0, BS, True), Allocation(BS, BS, False),
                                         Allocation(2 * BS, BS, True),
                                         Allocation(3 * BS, BS, False)]
    assert vol.read(BS, BS) == bytes(BS)
    vol.write(2 * BS, bytes(BS))  # data overwritten by zeros: a hole again
    assert vol.allocation(0, 4 * BS) == [Allocation(0, BS, True), Allocation(BS, 3 * BS, False)]
    # A partial write that leaves a block all zero makes it a hole too.
    vol.write(10 * BS + 5, b"hello")
    vol.write(10 * BS + 5, bytes(5))
    assert vol.allocation(10 * BS, BS) == [Allocation(10 * BS, BS, False)]
    vol.close()
    # ... and no data was stored for the zeros.
    stored = sum(vol.store.head(names.segment_key("vol", s)) for s in segment_seqs(vol.store, "vol"))
    assert stored < 8 * BS


def test_trim_and_write_zeroes_on_partial_blocks(make_volume):
    vol = make_volume()
    data = blocks(1, 0, 4)
    vol.write(0, data)
    vol.trim(100, 2 * BS)                      # block 1 whole, blocks 0 and 2 in part
    model = bytearray(data)
    model[100:100 + 2 * BS] = bytes(2 * BS)
    assert vol.read(0, 4 * BS) == model
    assert vol.allocation(0, 4 * BS) == [Allocation(0, BS, True), Allocation(BS, BS, False),
                                         Allocation(2 * BS, 2 * BS, True)]
    vol.write_zeroes(3 * BS + 10, 20)          # inside one block
    model[3 * BS + 10:3 * BS + 30] = bytes(20)
    vol.write_zeroes(2 * BS, BS)               # exactly one block
    model[2 * BS:3 * BS] = bytes(BS)
    assert vol.read(0, 4 * BS) == model
    assert vol.allocation(0, 4 * BS) == [Allocation(0, BS, True), Allocation(BS, 2 * BS, False),
                                         Allocation(3 * BS, BS, True)]
    # An unaligned allocation query covers exactly the bytes asked for.
    assert vol.allocation(100, 5000) == [Allocation(100, BS - 100, True),
                                         Allocation(BS, 5100 - BS, False)]
    vol.trim(0, SIZE // 2)
    assert vol.allocation(0, 4 * BS) == [Allocation(0, 4 * BS, False)]


def test_out_of_range_requests_are_invalid(make_volume):
    vol = make_volume()
    bad = [
        lambda: vol.read(SIZE - 1, 2), lambda: vol.read(SIZE, 1), lambda: vol.read(-1, 1),
        lambda: vol.read(0, -1), lambda: vol.read(0, MAX_REQUEST + BS),
        lambda: vol.write(SIZE - 2, b"abc"), lambda: vol.write(-BS, b"x"),
        lambda: vol.write_zeroes(SIZE - BS, 2 * BS), lambda: vol.trim(SIZE, BS),
        lambda: vol.trim(0, -BS), lambda: vol.allocation(SIZE - BS, 2 * BS),
    ]
    for call in bad:
        with pytest.raises(InvalidRequest) as info:
            call()
        assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidRequest), vol.transaction() as txn:
        txn.write(0, b"ok")
        txn.write(SIZE, b"x")
    assert vol.read(0, 2) == b"\0\0", "a refused transaction wrote something"
    # The edges themselves are fine.
    assert vol.read(SIZE, 0) == b""
    vol.write(SIZE - 3, b"end")
    assert vol.read(SIZE - 3, 3) == b"end"
    vol.write(0, b"x" * MAX_REQUEST)  # the largest request
    assert vol.read(MAX_REQUEST - 1, 2) == b"x\0"


def test_read_only_volume_refuses_writes(make_volume, store, tmp_path):
    vol = make_volume()
    vol.write(0, block(1, 0))
    vol.close()
    ro = Volume.open(store, "vol", cache_root=str(tmp_path / "ro"), read_only=True)
    try:
        assert ro.read_only
        for call in (lambda: ro.write(0, b"x"), lambda: ro.write_zeroes(0, BS),
                     lambda: ro.trim(0, BS), lambda: ro.flush(), lambda: ro.resize(2 * SIZE),
                     lambda: ro.transaction(), lambda: ro.checkpoint()):
            with pytest.raises(ReadOnlyError) as info:
                call()
            assert isinstance(info.value, PermissionError)
        assert ro.read(0, BS) == block(1, 0)
    finally:
        ro.close()


def test_resize_grows_and_never_shrinks(make_volume, store, tmp_path):
    vol = make_volume(flush_mode="store")
    vol.write(SIZE - BS, block(1, SIZE // BS - 1))
    with pytest.raises(InvalidRequest):
        vol.write(SIZE, b"x")
    vol.resize(SIZE + 16 * MiB)
    assert vol.size == SIZE + 16 * MiB
    vol.write(SIZE, block(2, SIZE // BS))
    assert vol.read(SIZE - BS, 2 * BS) == block(1, SIZE // BS - 1) + block(2, SIZE // BS)
    with pytest.raises(InvalidRequest):
        vol.resize(SIZE)                       # shrinking
    with pytest.raises(InvalidRequest):
        vol.resize(SIZE + 16 * MiB + 100)      # not a multiple of the block size
    assert vol.size == SIZE + 16 * MiB
    # resize() flushed: a reader of the store sees the new size (a RESIZE record in the log).
    ro = Volume.open(store, "vol", cache_root=str(tmp_path / "ro"), read_only=True)
    try:
        assert ro.size == SIZE + 16 * MiB
    finally:
        ro.close()
    vol = _reopen(vol, tmp_path)
    assert vol.size == SIZE + 16 * MiB
    vol.resize(SIZE + 32 * MiB)
    vol = _reopen(vol, tmp_path, lose_cache=True)  # from the checkpoint written at close
    try:
        assert vol.size == SIZE + 32 * MiB
        assert vol.read(SIZE, BS) == block(2, SIZE // BS)
        assert vol.read(SIZE + 16 * MiB, BS) == bytes(BS)
    finally:
        vol.close()


def test_resize_survives_a_crash(make_volume, store, tmp_path):
    vol = make_volume()
    vol.resize(SIZE * 2)                       # resize() flushes
    vol.write(SIZE + BS, block(3, SIZE // BS + 1))
    vol.flush()
    vol.abandon()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), break_lease=True)
    try:
        assert vol.size == SIZE * 2
        assert vol.read(SIZE + BS, BS) == block(3, SIZE // BS + 1)
    finally:
        vol.close()


# --- transactions ----------------------------------------------------------------------


def test_transaction_commits_together(make_volume, tmp_path):
    vol = make_volume()
    with vol.transaction() as txn:
        txn.write(0, block(1, 0))
        txn.write_zeroes(BS, BS)
        txn.trim(2 * BS, BS)
        txn.write(10 * BS, block(1, 10))
        assert vol.read(0, BS) == bytes(BS), "a transaction is visible before it commits"
    assert vol.read(0, BS) == block(1, 0) and vol.read(10 * BS, BS) == block(1, 10)


def test_transaction_abandoned_by_an_exception_leaves_nothing(make_volume, tmp_path):
    vol = make_volume()
    vol.write(0, block(1, 0))
    with pytest.raises(RuntimeError), vol.transaction() as txn:
        txn.write(0, block(2, 0))
        txn.write(BS, block(2, 1))
        raise RuntimeError("changed my mind")
    assert vol.read(0, 2 * BS) == block(1, 0) + bytes(BS)
    vol = _reopen(vol, tmp_path)
    try:
        assert vol.read(0, 2 * BS) == block(1, 0) + bytes(BS)
    finally:
        vol.close()


def _fail_nth_append(monkeypatch, n: int, error: BaseException, *, keep_tail: bool = False):
    """Make the n-th OpenSegment.append from now raise `error` (after it wrote
    nothing).  keep_tail: also turn rollback into a no-op, so what was
    appended stays in the journal, as after a crash in the middle."""
    real = OpenSegment.append
    calls = {"n": 0}

    def append(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(self, *a, **kw)

    monkeypatch.setattr(OpenSegment, "append", append)
    if keep_tail:
        monkeypatch.setattr(OpenSegment, "rollback", lambda self, mark, **kw: None)
    return calls


def test_transaction_failing_half_way_leaves_nothing_visible(make_volume, tmp_path, monkeypatch):
    vol = make_volume()
    vol.write(0, block(1, 0))
    vol.write(8 * BS, block(1, 8))
    _fail_nth_append(monkeypatch, 2, OSError(errno.ENOSPC, "injected: disk full"))
    with pytest.raises(OSError), vol.transaction() as txn:
        txn.write(0, block(2, 0))
        txn.write(8 * BS, block(2, 8))
        txn.write(16 * BS, block(2, 16))
    monkeypatch.undo()
    assert vol.read(0, BS) == block(1, 0)
    assert vol.read(8 * BS, BS) == block(1, 8)
    assert vol.read(16 * BS, BS) == bytes(BS)
    # The volume goes on working, and the failed transaction never comes back.
    vol.write(24 * BS, block(3, 24))
    vol = _reopen(vol, tmp_path)
    try:
        assert vol.read(0, BS) == block(1, 0) and vol.read(8 * BS, BS) == block(1, 8)
        assert vol.read(16 * BS, BS) == bytes(BS) and vol.read(24 * BS, BS) == block(3, 24)
    finally:
        vol.close()


def test_a_failing_sync_stops_writes_and_loses_nothing(make_volume, store, tmp_path,
                                                       monkeypatch):
    """The sealer's fsync fails (a dying disk): the volume stops taking
    writes with a clear error, keeps serving reads, keeps its lease and its
    journals on close, and the next open replays them."""
    vol = make_volume(segment_size=64 * 1024)
    vol.write(0, block(1, 0))
    vol.flush()

    def failing_finish(self):
        raise OSError(errno.EIO, "injected: fsync failed")

    monkeypatch.setattr(OpenSegment, "finish", failing_finish)
    data = blocks(2, 16, 32)                       # 128 KiB: seals a 64 KiB segment
    for i in range(0, len(data), 16 * BS):
        try:
            vol.write(16 * BS + i, data[i:i + 16 * BS])
        except StoreError:
            break
    assert testing.wait_failed(vol)
    with pytest.raises(StoreError, match="stopped taking writes"):
        vol.write(100 * BS, block(3, 100))
    with pytest.raises(StoreError, match="stopped taking writes"):
        vol.flush()
    acknowledged = vol.read(16 * BS, len(data))   # reads go on
    assert vol.read(0, BS) == block(1, 0)
    vol.close()
    assert store.exists(names.lease_key("vol")), "the lease stays: the journals must win"
    monkeypatch.undo()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), break_lease=True)
    try:
        assert vol.read(0, BS) == block(1, 0)
        assert vol.read(16 * BS, len(data)) == acknowledged, "nothing written was lost"
        assert vol.read(100 * BS, BS) == bytes(BS), "the refused write never happened"
    finally:
        vol.close()


def test_multi_record_write_failing_half_way_leaves_nothing(make_volume, tmp_path, monkeypatch):
    """One write whose data has a zero block in the middle is three records
    (DATA, ZERO, DATA): all or nothing too."""
    vol = make_volume()
    _fail_nth_append(monkeypatch, 3, OSError(errno.EIO, "injected"))
    with pytest.raises(OSError):
        vol.write(0, block(1, 0) + bytes(BS) + block(1, 2))
    monkeypatch.undo()
    assert vol.read(0, 3 * BS) == bytes(3 * BS)
    assert vol.allocation(0, 3 * BS) == [Allocation(0, 3 * BS, False)]


def test_crash_in_the_middle_of_a_transaction_drops_it(make_volume, store, tmp_path, monkeypatch):
    """The first records of a transaction reached the journal, then the process
    died: recovery keeps only transactions whose commit record is there."""
    vol = make_volume()
    vol.write(0, block(1, 0))
    vol.flush()
    _fail_nth_append(monkeypatch, 3, KeyboardInterrupt(), keep_tail=True)
    with pytest.raises(KeyboardInterrupt), vol.transaction() as txn:
        txn.write(BS, block(2, 1))
        txn.write(2 * BS, block(2, 2))
        txn.write(3 * BS, block(2, 3))
    journal = testing.journal(vol).path
    with open(journal, "rb") as f:
        f.seek(HEADER.size)
        found = list(scan_records(f, BS, HEADER.size, where="journal"))
    assert [r.flags & FLAG_COMMIT for r, _end in found] == [FLAG_COMMIT, 0, 0], \
        "the test needs two uncommitted records in the journal"
    vol.abandon()
    monkeypatch.undo()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), break_lease=True)
    try:
        assert vol.read(0, 4 * BS) == block(1, 0) + bytes(3 * BS)
    finally:
        vol.close()


# --- durability ----------------------------------------------------------------------


def test_flush_mode_store_puts_the_data_in_the_store(make_volume, store, tmp_path):
    vol = make_volume(flush_mode="store")
    vol.write(0, block(1, 0))
    vol.flush()
    assert segment_seqs(store, "vol") == [1]
    assert read_from_store(store, tmp_path / "ro1", 0, BS) == block(1, 0)
    vol.write(BS, block(2, 1), fua=True)  # FUA: durable in the store on return
    assert read_from_store(store, tmp_path / "ro2", 0, 2 * BS) == block(1, 0) + block(2, 1)


def test_flush_mode_store_reports_a_store_that_fails(store, tmp_path, monkeypatch):
    faulty = FaultyStore(store)
    create_volume(faulty, "vol", SIZE, flush_mode="store")
    vol = Volume.open(faulty, "vol", cache_root=str(tmp_path / "cache"))
    try:
        monkeypatch.setattr(sealer_mod, "STORE_FLUSH_TIMEOUT", 1.0)
        faulty.fail(op="put", key_prefix=names.segment_prefix("vol"), times=None,
                    error=StoreError)
        vol.write(0, block(1, 0))
        with pytest.raises(StoreError):
            vol.flush()
        assert segment_seqs(store, "vol") == []
        assert vol.read(0, BS) == block(1, 0)  # kept locally meanwhile
        faulty.heal()
        # The upload is retried at its next backoff step (up to seconds away).
        monkeypatch.setattr(sealer_mod, "STORE_FLUSH_TIMEOUT", 30.0)
        vol.flush()
        assert segment_seqs(store, "vol") == [1]
    finally:
        vol.close()
    assert read_from_store(store, tmp_path / "ro", 0, BS) == block(1, 0)


def test_journal_mode_flush_survives_a_crash(make_volume, store, tmp_path):
    vol = make_volume()
    vol.write(0, block(1, 0))
    vol.write(5 * BS, block(1, 5), fua=True)
    vol.flush()
    vol.abandon()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), break_lease=True)
    try:
        assert vol.read(0, BS) == block(1, 0) and vol.read(5 * BS, BS) == block(1, 5)
    finally:
        vol.close()
    # The replayed journal was uploaded: the store alone has it now.
    assert read_from_store(store, tmp_path / "ro", 5 * BS, BS) == block(1, 5)


# --- concurrency, the map --------------------------------------------------------------


def test_threads_writing_disjoint_ranges_and_reading(make_volume, tmp_path):
    vol = make_volume(segment_size=256 * 1024)
    region = 2 * MiB
    errors: list[BaseException] = []
    finals: dict[int, bytearray] = {}

    def worker(t: int) -> None:
        try:
            rng = random.Random(t)
            base = t * region
            model = bytearray(region)
            for i in range(120):
                off = rng.randrange(0, region - 1)
                length = min(region - off, rng.choice([1, 512, BS, 3 * BS + 7, 64 * 1024]))
                data = rng.randbytes(length)
                vol.write(base + off, data)
                model[off:off + length] = data
                probe = rng.randrange(0, region - BS)
                got = vol.read(base + probe, BS)
                assert got == model[probe:probe + BS], f"thread {t} step {i}"
                if i % 40 == 0:
                    vol.flush()
            finals[t] = model
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    stop = threading.Event()

    def scanner() -> None:
        try:
            while not stop.is_set():
                vol.read(0, 8 * region)
                vol.allocation(0, 8 * region)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    scan = threading.Thread(target=scanner)
    scan.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    scan.join(30)
    assert not errors, errors[0]
    expected = b"".join(bytes(finals[t]) for t in range(8))
    assert vol.read(0, 8 * region) == expected
    assert vol.stats["segments_sealed"] > 3, "the test should seal segments while writing"
    vol = _reopen(vol, tmp_path, lose_cache=True)
    try:
        assert vol.read(0, 8 * region) == expected
    finally:
        vol.close()


def test_the_map_is_extent_based(make_volume, tmp_path):
    vol = make_volume(size=128 * MiB)
    data = os.urandom(64 * MiB)
    vol.write(0, data[:32 * MiB])
    vol.write(32 * MiB, data[32 * MiB:])
    vol.flush()
    testing.seal_now(vol)
    assert testing.extent_count(vol) <= 2
    vol.write(10 * MiB, block(9, 2560))          # splits one extent in three
    testing.seal_now(vol)
    assert testing.extent_count(vol) == 4
    # A sequential write in 1 MiB requests: one extent per request, not per block.
    for off in range(64 * MiB, 128 * MiB, MiB):
        vol.write(off, data[off - 64 * MiB:off - 63 * MiB])
    testing.seal_now(vol)
    assert testing.extent_count(vol) <= 4 + 64
    vol = _reopen(vol, tmp_path, lose_cache=True)   # loaded from the checkpoint
    try:
        assert testing.extent_count(vol) <= 4 + 64
        expect = bytearray(data)
        expect[10 * MiB:10 * MiB + BS] = block(9, 2560)
        assert vol.read(0, 32 * MiB) == expect[:32 * MiB]
        assert vol.read(96 * MiB, 32 * MiB) == data[32 * MiB:]
    finally:
        vol.close()


# --- recovery planning (pure) --------------------------------------------------------


@pytest.mark.parametrize("seqs,base,upto,replay,orphans", [
    ([], 0, None, [], []),
    ([1, 2, 3], 0, None, [1, 2, 3], []),
    ([3, 1, 2, 2], 0, None, [1, 2, 3], []),             # any order, duplicates
    ([1, 2, 4, 5], 0, None, [1, 2], [4, 5]),            # a gap: what follows is orphaned
    ([2, 3], 0, None, [], [2, 3]),                      # the very first one missing
    ([1, 2, 3, 4, 5], 3, None, [4, 5], []),             # from a checkpoint
    ([1, 2, 3, 5], 3, None, [], [5]),
    ([1, 2], 5, None, [], []),                          # all covered by the checkpoint
    ([1, 2, 3, 4, 5, 6], 0, 4, [1, 2, 3, 4], []),       # a reader of the past: no orphans
    ([1, 2, 4, 5], 0, 4, [1, 2], []),
    ([5, 6, 7], 4, 5, [5], []),
])
def test_plan_replay(seqs, base, upto, replay, orphans):
    plan = plan_replay(iter(seqs), base, upto=upto)
    assert plan == ReplayPlan(base=base, replay=replay, orphans=orphans)
    assert plan.top == (replay[-1] if replay else base)


def test_plan_replay_random_against_a_simple_definition():
    rng = random.Random(9)
    for _ in range(300):
        seqs = sorted(rng.sample(range(1, 40), rng.randint(0, 30)))
        base = rng.choice([0, 0, rng.randint(0, 40)])
        plan = plan_replay(seqs, base)
        k = base
        while k + 1 in seqs:
            k += 1
        assert plan.replay == list(range(base + 1, k + 1))
        assert plan.orphans == [s for s in seqs if s > k]
        assert plan.top == k


# --- checksums ---------------------------------------------------------------------------


def test_crc32c_known_vectors():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA          # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_fast_crc32c_equals_the_reference():
    rng = random.Random(1)
    for _ in range(300):
        data = rng.randbytes(rng.choice([0, 1, 3, 4, 7, 8, 15, 63, 64, 65, 511, 4096, 10007]))
        assert crc32c(data) == crc32c_reference(data)
        assert crc32c(memoryview(data)) == crc32c_reference(data)
        start = rng.getrandbits(32)
        assert crc32c(data, start) == crc32c_reference(data, start)
        cut = rng.randint(0, len(data))
        assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)  # streaming
    big = rng.randbytes(1 << 20)
    assert crc32c(big) == crc32c_reference(big)


def test_mask_and_unmask():
    assert mask(0) == 0xA282EAD8
    assert mask(0xE3069283) == 0xC78AB0E5
    rng = random.Random(2)
    for crc in [0, 1, 0xFFFFFFFF, 0x80000000, *(rng.getrandbits(32) for _ in range(1000))]:
        m = mask(crc)
        assert 0 <= m <= 0xFFFFFFFF
        assert unmask(m) == crc
        assert m != crc
    assert masked_crc(b"123456789") == mask(0xE3069283)
    assert masked_crc(bytes(BS)) != 0  # a zero block does not check against a zero field


# --- the segment format ------------------------------------------------------------------

VOLID = bytes(range(16))
#: The header of segment 0x0102030405060708 of volume 00010203-...-0e0f, 4 KiB
#: blocks, created at 1700000000.123456789 s.  Changing it breaks every stored volume.
GOLDEN_HEADER = bytes.fromhex(
    "4c53424453454731"                      # magic "LSBDSEG1"
    "0100" "4000" "00100000"                # version 1, header length 64, block size 4096
    "000102030405060708090a0b0c0d0e0f"      # volume id
    "0807060504030201"                      # seq
    "15cd853dfe9c9717"                      # created, ns
    "0000000000000000" "00000000"           # reserved
    "02faa13d")                             # masked CRC32C of the above
GOLDEN_RECORD = bytes.fromhex(
    "4c524543" "01" "01" "0000"             # "LREC", DATA, COMMIT, reserved
    "0700000000000000" "02000000"           # lba 7, 2 blocks
    "c28459fd" "1111111111111111")          # masked CRC of header + CRC array; the array


def test_golden_header_bytes():
    assert HEADER.size == 64 and RECORD.size == 24
    header = encode_header(VOLID, 0x0102030405060708, 4096, 1_700_000_000_123_456_789)
    assert header == GOLDEN_HEADER
    assert struct.unpack("<I", GOLDEN_HEADER[-4:])[0] == mask(crc32c_reference(GOLDEN_HEADER[:-4]))
    h = decode_header(GOLDEN_HEADER)
    assert (h.volume_id, h.seq, h.block_size, h.created_ns) == (
        VOLID, 0x0102030405060708, 4096, 1_700_000_000_123_456_789)


def test_golden_record_bytes():
    assert encode_record(DATA, FLAG_COMMIT, 7, 2, b"\x11" * 8) == GOLDEN_RECORD


def test_a_one_block_record_checks_its_block_without_the_index():
    """A block read with the header and CRC of its one-block record is
    checked against them; a byte changed anywhere in the three is caught,
    and so is a block of a longer record or a record of another kind."""
    data = bytes(range(256)) * 16
    rec = b"junk" + encode_record(DATA, FLAG_COMMIT, 7, 1, block_crcs(data, 4096)) + data
    assert len(rec) == 4 + ONE_BLOCK_HEAD + 4096
    assert one_block_record_holds(rec, 4, 4096)
    assert not one_block_record_holds(rec, 3, 4096)           # not where a record starts
    assert not one_block_record_holds(rec[:-1], 4, 4096)      # short
    for where in (4, 4 + 9, 4 + 12, 4 + 20, 4 + 24, 4 + 27, 4 + 28, 4 + 2000, len(rec) - 1):
        bad = bytearray(rec)
        bad[where] ^= 0x01
        assert not one_block_record_holds(bad, 4, 4096), where
    two = encode_record(DATA, 0, 7, 2, block_crcs(data * 2, 4096)) + data * 2
    assert not one_block_record_holds(two, 0, 4096)
    zero = encode_record(2, 0, 7, 1) + bytes(4) + bytes(4096)
    assert not one_block_record_holds(zero, 0, 4096)


def _trailer() -> Trailer:
    return Trailer(volume_id=VOLID, seq=5, footer_offset=4096, footer_length=48, record_count=2,
                   sealed_ns=1_700_000_001_000_000_000, volume_size=64 * MiB,
                   footer_crc=0xDEADBEEF)


def test_trailer_round_trip():
    raw = encode_trailer(_trailer())
    assert len(raw) == TRAILER.size
    assert raw[:8] == b"LSBDEND1"
    assert struct.unpack("<I", raw[-4:])[0] == mask(crc32c_reference(raw[:-4]))
    assert decode_trailer(b"anything before it" + raw) == _trailer()


@pytest.mark.parametrize("where", [0, 9, 30, 63])
def test_damaged_header_is_rejected(where):
    bad = bytearray(GOLDEN_HEADER)
    bad[where] ^= 0x01
    with pytest.raises(CorruptionError):
        decode_header(bytes(bad))
    with pytest.raises(CorruptionError):
        decode_header(GOLDEN_HEADER[:40])


@pytest.mark.parametrize("where", [0, 20, 50, -1])
def test_damaged_trailer_is_rejected(where):
    good = encode_trailer(_trailer())
    bad = bytearray(good)
    bad[where] ^= 0x80
    with pytest.raises(CorruptionError):
        decode_trailer(bytes(bad))
    with pytest.raises(CorruptionError):
        decode_trailer(good[:-1])


def test_footer_round_trip_and_damage():
    records = [Record(DATA, 0, 10, 2, 88, b"\x01\x02\x03\x04" * 2),
               Record(ZERO, 0, 50, 7, 0, b""),
               Record(TRIM, FLAG_COMMIT, 0, 100, 0, b""),
               Record(DATA, FLAG_COMMIT, 3, 1, 9000, b"\xaa\xbb\xcc\xdd")]
    footer = encode_footer(records)
    t = Trailer(volume_id=VOLID, seq=1, footer_offset=100, footer_length=len(footer),
                record_count=len(records), sealed_ns=1, volume_size=SIZE,
                footer_crc=masked_crc(footer))
    assert decode_footer(footer, t) == records
    bad = bytearray(footer)
    bad[5] ^= 1
    with pytest.raises(CorruptionError):
        decode_footer(bytes(bad), t)
    with pytest.raises(CorruptionError):
        decode_footer(footer[:-1], t)
    assert decode_one_block_footer(footer, t) is None       # records of several kinds

    # An index of one-block writes only, read on arrays: the same lbas and
    # offsets in the same order, checked the same way.
    ones = [Record(DATA, 0, lba, 1, 4096 * i, bytes([i, 1, 2, 3]))
            for i, lba in enumerate([7, 3, 7, 1 << 40, 0], 1)]
    one_footer = encode_footer(ones)
    t1 = Trailer(volume_id=VOLID, seq=1, footer_offset=100, footer_length=len(one_footer),
                 record_count=len(ones), sealed_ns=1, volume_size=SIZE,
                 footer_crc=masked_crc(one_footer))
    lbas, offsets = decode_one_block_footer(one_footer, t1)
    assert list(lbas) == [r.lba for r in decode_footer(one_footer, t1)]
    assert list(offsets) == [r.data_offset for r in ones]
    bad = bytearray(one_footer)
    bad[9] ^= 1
    with pytest.raises(CorruptionError):
        decode_one_block_footer(bytes(bad), t1)
    # A zeroing and a two-block write take as many bytes as two one-block
    # writes, and read at that stride both say one block: not read as such.
    mixed = [Record(ZERO, 0, 5, 1, 0, b""), Record(DATA, 0, 1, 2, 4096, b"\1" * 8)]
    mixed_footer = encode_footer(mixed)
    assert len(mixed_footer) == len(encode_footer(ones[:2]))
    t2 = Trailer(volume_id=VOLID, seq=1, footer_offset=100, footer_length=len(mixed_footer),
                 record_count=2, sealed_ns=1, volume_size=SIZE, footer_crc=masked_crc(mixed_footer))
    assert decode_one_block_footer(mixed_footer, t2) is None
    idx = SegmentIndex(records, BS)
    assert idx.crc_at(88 + BS) == unmask(0x04030201)       # plain, as a read computes it
    assert idx.crc_at(9000) == unmask(0xDDCCBBAA)
    assert list(idx.crcs_for(88, 2)) == [unmask(0x04030201)] * 2
    assert idx.crcs_for(88 + BS, 2) is None                 # runs past its record
    for off in (87, 89, 88 + 2 * BS, 0):
        with pytest.raises(KeyError):
            idx.crc_at(off)


def _same_index(a: SegmentIndex, b: SegmentIndex, offsets: list[int]) -> None:
    assert a.nbytes == b.nbytes
    for off in offsets:
        for probe in (off, off + 1, off + BS):
            try:
                expected = a.crc_at(probe)
            except KeyError:
                with pytest.raises(KeyError):
                    b.crc_at(probe)
            else:
                assert b.crc_at(probe) == expected
        assert a.crcs_for(off, 1) == b.crcs_for(off, 1)


def test_an_index_read_on_arrays_is_the_index_of_its_records():
    """index_of_footer reads an index of one-block records with numpy: the
    same index as SegmentIndex of the decoded records, checked the same way;
    other indexes are decoded as before."""
    rng = random.Random(3)
    ones = [Record(DATA, 0, rng.randrange(1 << 30), 1, 64 + (BS + 28) * i + 28,
                   rng.randbytes(4)) for i in range(300)]
    ones[5] = ones[5]._replace(crcs=b"\xd8\xea\x82\xa2")      # masked 0: MASK_DELTA itself
    ones[6] = ones[6]._replace(crcs=b"\0\0\0\0")
    ones[7], ones[8] = ones[8], ones[7]                          # one out of file order
    for records in (ones, [Record(ZERO, 0, 5, 1, 0, b""), *ones[:20]],
                    [*ones[:10], Record(DATA, 0, 1, 3, 1 << 33, rng.randbytes(12))]):
        footer = encode_footer(records)
        t = Trailer(volume_id=VOLID, seq=1, footer_offset=100, footer_length=len(footer),
                    record_count=len(records), sealed_ns=1, volume_size=SIZE,
                    footer_crc=masked_crc(footer))
        offsets = [r.data_offset for r in records]
        _same_index(SegmentIndex(decode_footer(footer, t), BS), index_of_footer(footer, t, BS),
                    offsets)
        bad = bytearray(footer)
        bad[30] ^= 1
        with pytest.raises(CorruptionError):
            index_of_footer(bytes(bad), t, BS)
    assert index_of_footer(encode_footer(ones), Trailer(
        volume_id=VOLID, seq=1, footer_offset=100, footer_length=len(encode_footer(ones)),
        record_count=len(ones), sealed_ns=1, volume_size=SIZE,
        footer_crc=masked_crc(encode_footer(ones))), BS).crc_at(ones[5].data_offset) == 0


def _seal(seg: OpenSegment, volume_size: int) -> Trailer:
    """OpenSegment.seal, giving a previous-segment link if this version takes one."""
    if "prev_crc" in inspect.signature(seg.seal).parameters:
        return seg.seal(volume_size, prev_crc=0)
    return seg.seal(volume_size)


def _can_preallocate(folder) -> bool:
    from lsbd.linux import preallocate
    path = os.path.join(folder, "probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        preallocate(fd, 1 << 20)
        return os.fstat(fd).st_blocks * 512 >= 1 << 20
    finally:
        os.close(fd)
        os.unlink(path)


def test_a_journal_reserves_its_blocks_and_its_segment_gives_back_the_rest(make_volume):
    vol = make_volume(segment_size=4 * MiB)
    vol.write(0, blocks(1, 0, 2))
    journal = testing.journal(vol).path
    if _can_preallocate(os.path.dirname(journal)):
        assert os.stat(journal).st_blocks * 512 >= 4 * MiB, "the journal's blocks are reserved"
    assert os.path.getsize(journal) < 64 * 1024, "without changing its size"
    seq = testing.seal_now(vol)
    sealed = testing.local_path(vol, seq)
    st = os.stat(sealed)
    assert st.st_blocks * 512 <= st.st_size + 64 * 1024, "the unused reservation is given back"
    assert vol.read(0, 2 * BS) == blocks(1, 0, 2)
    # A refused write (its edge block would wait) keeps the reservation.
    vol.write(8 * BS, blocks(2, 8, 1))
    j = testing.journal(vol)
    j.rollback(j.mark())
    if _can_preallocate(os.path.dirname(journal)):
        assert os.stat(testing.journal(vol).path).st_blocks * 512 >= 4 * MiB


def test_sealed_segment_round_trip(tmp_path):
    path = str(tmp_path / "seg")
    seg = OpenSegment(path, volume_id=VOLID, seq=7, block_size=BS)
    data = blocks(1, 10, 3)
    seg.append(DATA, 10, 3, data=data, crcs=block_crcs(data, BS), commit=False)
    seg.append(ZERO, 40, 5)
    seg.append(DATA, 2, 1, data=block(2, 2), crcs=block_crcs(block(2, 2), BS), commit=True)
    trailer = _seal(seg, SIZE)
    got_trailer, got = read_sealed_index(path, where="seg")
    assert got_trailer == trailer and got == seg.records
    assert [(r.kind, r.lba, r.nblocks, r.flags) for r in got] == [
        (DATA, 10, 3, 0), (ZERO, 40, 5, 0), (DATA, 2, 1, FLAG_COMMIT)]
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:8] == b"LSBDSEG1" and raw[-TRAILER.size:-TRAILER.size + 8] == b"LSBDEND1"
    assert decode_header(raw).seq == 7
    assert raw[got[0].data_offset:got[0].data_offset + 3 * BS] == data
    assert raw[got[2].data_offset:got[2].data_offset + BS] == block(2, 2)
    # The same bytes pass the scrubber's checks.
    from lsbd.meta.config import VolumeConfig
    from lsbd.segments.scrub import verify_segment
    cfg = VolumeConfig(name="vol", volume_id=uuid.UUID(bytes=VOLID).hex, size=SIZE)
    assert verify_segment(raw, cfg, 7) == []
    assert verify_segment(raw, cfg, 8)  # wrong seq: reported


def _recover(path: str, **kw):
    """recover_journal_file, giving a previous-segment link if this version takes one."""
    if "prev_crc" in inspect.signature(recover_journal_file).parameters:
        kw.setdefault("prev_crc", 0)
    return recover_journal_file(path, **kw)


def test_journal_recovery_keeps_committed_records_only(tmp_path):
    path = str(tmp_path / "journal")
    seg = OpenSegment(path, volume_id=VOLID, seq=3, block_size=BS)
    a, b, c = block(1, 0), block(2, 1), block(3, 2)
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=True)
    seg.append(DATA, 1, 1, data=b, crcs=block_crcs(b, BS), commit=False)
    seg.append(DATA, 2, 1, data=c, crcs=block_crcs(c, BS), commit=True)
    committed_end = seg.end
    seg.append(DATA, 5, 1, data=c, crcs=block_crcs(c, BS), commit=False)  # never committed
    seg.sync()
    os.close(seg.fd)
    # A torn last record too: cut the file in the middle of its data.
    os.truncate(path, seg.end - 100)
    trailer, records = _recover(path, volume_id=VOLID, seq=3, block_size=BS,
                                            volume_size=SIZE)
    assert [(r.lba, r.flags) for r in records] == [(0, FLAG_COMMIT), (1, 0), (2, FLAG_COMMIT)]
    assert trailer.footer_offset == committed_end
    # The file is a sealed segment now, and reading it again changes nothing.
    assert read_sealed_index(path, where="j") == (trailer, records)
    assert _recover(path, volume_id=VOLID, seq=3, block_size=BS,
                                volume_size=SIZE) == (trailer, records)


def test_append_many_is_one_system_call_with_each_record_its_own(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    seg = OpenSegment(path, volume_id=VOLID, seq=3, block_size=BS)
    a, b, c = block(1, 0), block(2, 1), blocks(3, 4, 3)
    calls = []
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda *args: calls.append(args) or real(*args))
    seg.append_many([(DATA, 0, 1, a, block_crcs(a, BS), True),
                     (ZERO, 2, 2, None, b"", True),
                     (DATA, 1, 1, b, block_crcs(b, BS), False),
                     (DATA, 4, 3, c, block_crcs(c, BS), True)])
    assert len(calls) == 1
    assert [(r.kind, r.lba, r.flags) for r in seg.records] == [
        (DATA, 0, FLAG_COMMIT), (ZERO, 2, FLAG_COMMIT), (DATA, 1, 0), (DATA, 4, FLAG_COMMIT)]
    assert seg.blocks[2][0] == seg.blocks[3][0] < 0           # zeroed: holes in the index
    with open(path, "rb") as f:
        for r, data in zip([seg.records[0], seg.records[3]], [a, c]):
            f.seek(r.data_offset)
            assert f.read(len(data)) == data
    # Cut inside the last record: the transactions before it survive a crash,
    # the one it ends (with the uncommitted record of block 1) does not.
    seg.sync()
    os.close(seg.fd)
    os.truncate(path, seg.end - 100)
    _trailer, records = _recover(path, volume_id=VOLID, seq=3, block_size=BS, volume_size=SIZE)
    assert [r.lba for r in records] == [0, 2]


def test_write_many_is_a_series_of_writes(make_volume, tmp_path):
    vol = make_volume()
    a, b, c = block(1, 0), block(2, 1), block(3, 0)
    vol.write(5 * BS, blocks(9, 5, 2))
    vol.write_many([(0, a), (BS, b), (0, c),                 # a later write wins
                    (5 * BS, bytes(BS)),                      # zeros: stored as a hole
                    (8 * BS, blocks(4, 8, 3))], nowait=True)
    expected = c + b + bytes(3 * BS) + bytes(BS) + blocks(9, 6, 1) + bytes(BS) + blocks(4, 8, 3)
    assert vol.read(0, 11 * BS) == expected
    assert vol.stats["writes"] == 6
    assert vol.allocation(5 * BS, BS) == [Allocation(5 * BS, BS, False)]
    vol = _reopen(vol, tmp_path)
    assert vol.read(0, 11 * BS) == expected
    vol = _reopen(vol, tmp_path, lose_cache=True)           # from the store alone
    assert vol.read(0, 11 * BS) == expected


def test_write_many_does_all_or_nothing(make_volume):
    vol = make_volume()
    for bad in [(100, block(1, 0)), (0, b"x" * 100), (SIZE, block(1, 0)), (0, b"")]:
        with pytest.raises(InvalidRequest):
            vol.write_many([(BS, block(2, 1)), bad])
    assert vol.read(BS, BS) == bytes(BS), "a refused batch wrote nothing"
    # The sealer far behind: nowait refuses the whole batch, having done nothing.
    with testing.sealer_far_behind(vol):
        with pytest.raises(WouldBlock):
            vol.write_many([(BS, block(2, 1))], nowait=True)
    assert vol.read(BS, BS) == bytes(BS)
    vol.flush_to_store()
    reader = Volume.open(vol.store, "vol", cache_root=vol.cache_root, read_only=True)
    try:
        with pytest.raises(ReadOnlyError):
            reader.write_many([(0, block(1, 0))])
    finally:
        reader.close()


def test_masked_crcs_in_bulk_match_one_at_a_time():
    from lsbd.format.segment import pack_masked, raw_block_crcs
    rng = random.Random(7)
    for n in (1, 2, 7, 8, 9, 64, 256, 300):
        data = bytes(rng.getrandbits(8) for _ in range(64)) * (n * BS // 64)
        data = os.urandom(n * BS) if n % 2 else data
        expected = b"".join(struct.pack("<I", mask(crc32c_reference(data[i * BS:(i + 1) * BS])))
                            for i in range(n))
        assert block_crcs(data, BS) == expected
        assert pack_masked(raw_block_crcs(data, BS)) == expected
    edge = [0, 1, 0x7FFF, 0x8000, 0xFFFFFFFF, 0x5D7D1527, 0xA282EAD8, 1 << 31] * 2
    assert pack_masked(edge) == struct.pack(f"<{len(edge)}I", *map(mask, edge))


def test_journal_with_nothing_committed_is_dropped(tmp_path):
    path = str(tmp_path / "journal")
    seg = OpenSegment(path, volume_id=VOLID, seq=3, block_size=BS)
    a = block(1, 0)
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=False)
    os.close(seg.fd)
    assert _recover(path, volume_id=VOLID, seq=3, block_size=BS,
                                volume_size=SIZE) is None
    assert not os.path.exists(path)


def test_a_journal_closed_unsynced_never_reports_itself_synced(tmp_path):
    """sync() after the file is closed: a no-op once finish() synced it, an
    error after a crash-like close (close_fd) left appended bytes unsynced,
    nothing for a discarded journal that held no record (#16)."""
    a = block(1, 0)
    seg = OpenSegment(str(tmp_path / "dirty"), volume_id=VOLID, seq=3, block_size=BS)
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=True)
    seg.close_fd()
    with pytest.raises(OSError, match="closed before it was synced"):
        seg.sync()
    seg = OpenSegment(str(tmp_path / "finished"), volume_id=VOLID, seq=3, block_size=BS)
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=True)
    seg.seal(SIZE, 0)
    seg.finish()
    seg.close_fd()
    seg.sync()
    seg = OpenSegment(str(tmp_path / "synced"), volume_id=VOLID, seq=3, block_size=BS)
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=True)
    seg.sync()
    seg.close_fd()
    seg.sync()
    seg = OpenSegment(str(tmp_path / "empty"), volume_id=VOLID, seq=3, block_size=BS)
    mark = seg.mark()
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=True)
    seg.rollback(mark, failed=True)
    seg.discard()
    seg.sync()


def test_journal_of_another_volume_is_refused(tmp_path):
    path = str(tmp_path / "journal")
    seg = OpenSegment(path, volume_id=VOLID, seq=3, block_size=BS)
    a = block(1, 0)
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=True)
    os.close(seg.fd)
    with pytest.raises(CorruptionError):
        _recover(path, volume_id=bytes(16), seq=3, block_size=BS, volume_size=SIZE)
    with pytest.raises(CorruptionError):
        _recover(path, volume_id=VOLID, seq=4, block_size=BS, volume_size=SIZE)


def test_scan_records_stops_at_a_damaged_record(tmp_path):
    path = str(tmp_path / "journal")
    seg = OpenSegment(path, volume_id=VOLID, seq=1, block_size=BS)
    for i in range(4):
        d = block(i, i)
        seg.append(DATA, i, 1, data=d, crcs=block_crcs(d, BS), commit=True)
    os.close(seg.fd)
    second = seg.records[1].data_offset
    with open(path, "r+b") as f:
        f.seek(second + 10)
        f.write(b"\xff")       # data of record 2 no longer matches its CRC
    with open(path, "rb") as f:
        found = [r.lba for r, _end in scan_records(f, BS, HEADER.size, where="j")]
    assert found == [0]


def _folder_bytes(path: str) -> int:
    total = 0
    for name in os.listdir(path):
        try:
            total += os.path.getsize(os.path.join(path, name))
        except FileNotFoundError:  # evicted while we looked
            pass
    return total


def test_a_fetch_that_ends_after_close_leaves_the_cache_dir_alone(make_volume, tmp_path):
    """A whole-segment fetch may still be running when the volume closes
    (or crashes); the next writer may own the cache dir by then, so the
    fetch drops what it got instead of writing it there."""
    vol = make_volume()
    vol.write(0, blocks(1, 0, 4))
    vol = _reopen(vol, tmp_path, lose_cache=True)       # the segment is remote only
    seq = vol.applied_seq
    files = testing.local_files(vol)
    files.close()                                        # as at a close or a crash
    files._fetch_whole(seq)                              # the fetch ends after it
    assert not os.path.exists(files.path(seq))
    assert not [n for n in os.listdir(files.folder) if n.endswith(".part")]
    vol.close()


def test_segments_linked_into_a_local_store_are_never_evicted(make_volume, tmp_path,
                                                              in_page_cache):
    """A file:// store on the same file system links each segment in: the
    cache's file is the store's, so evicting it would free nothing and turn
    local reads into store reads."""
    vol = make_volume(segment_size=128 * 1024, open_kw={"cache_limit": 256 * 1024})
    data = os.urandom(4 * MiB)
    for off in range(0, 4 * MiB, 64 * 1024):
        vol.write(off, data[off:off + 64 * 1024])
    vol.flush_to_store()
    folder = os.path.join(vol.folder, "segments")
    names_ = [n for n in os.listdir(folder) if n.endswith(".seg")]
    assert len(names_) >= 30, "every segment is still here, though far over the limit"
    assert all(os.stat(os.path.join(folder, n)).st_nlink == 2 for n in names_)
    # The files held in the page cache (something on the machine may have
    # dropped it since the writes): a nowait read is then served only from
    # the cache dir's files, never from the store.
    in_page_cache(*(os.path.join(folder, n) for n in names_))
    assert vol.read(0, 4 * MiB, nowait=True) == data, "all of it is local"


@pytest.mark.parametrize("flush_mode", ["journal", "store"])
def test_tiny_segment_cache_evicts_and_refetches(make_volume, store, tmp_path, flush_mode,
                                                 monkeypatch):
    """With a segment cache far smaller than the data, blocks are read back
    from the store; segments not yet uploaded are never evicted."""
    # A store that copies (as any remote store does): the cache holds its own copies.
    monkeypatch.setattr(LocalStore, "put_file", Store.put_file)
    vol = make_volume(segment_size=128 * 1024, flush_mode=flush_mode,
                      open_kw={"cache_limit": 256 * 1024})
    rng = random.Random(11)
    model = bytearray(4 * MiB)
    for i in range(150):
        n = rng.randint(1, 16)
        lba = rng.randrange(0, len(model) // BS - n)
        data = blocks(i + 1, lba, n)
        vol.write(lba * BS, data)
        model[lba * BS:(lba + n) * BS] = data
        if i % 10 == 0:
            vol.flush()
    assert vol.read(0, len(model)) == model
    cached = _folder_bytes(os.path.join(vol.folder, "segments"))
    vol = _reopen(vol, tmp_path, cache_limit=256 * 1024)
    try:
        assert vol.read(0, len(model)) == model
        for _ in range(50):
            off = rng.randrange(0, len(model) - 3 * BS)
            assert vol.read(off, 3 * BS) == model[off:off + 3 * BS]
        assert cached < 2 * MiB, f"the cache holds {cached} bytes with a 256 KiB limit"
    finally:
        vol.close()


def test_stats_count_the_segments_the_cache_evicts(tmp_path):
    """`lsbd stats` counts the segments (and their bytes) the cache evicted,
    over its limit and to make room on the disk alike."""
    from engine_helpers import open_test_store
    from lsbd.segments.copies import LocalCopies

    store = open_test_store("file://" + str(tmp_path / "store"))
    files = LocalCopies(str(tmp_path / "cache"), store, lambda seq: f"seg/{seq:016x}", BS,
                        cache_limit=250)
    try:
        for seq in range(5):
            with open(files.path(seq), "wb") as f:
                f.write(bytes(100 + seq))
            files.adopt(seq)
        state = files.cache_state()
        assert files.local_seqs() == [3, 4]
        assert (state["cache_evicted_segments"], state["cache_evicted_bytes"]) == (3, 303)
        assert not files.make_room(state["cache_disk_free"] + (1 << 40))   # never enough
        state = files.cache_state()
        assert files.local_seqs() == []
        assert (state["cache_evicted_segments"], state["cache_evicted_bytes"]) == (5, 510)
    finally:
        files.close()
        store.close()


@pytest.mark.parametrize("big_range", [16, 2])
def test_open_segment_index_finds_the_newest_copy_of_every_block(tmp_path, monkeypatch, big_range):
    """The open segment keeps small records per block and large ones as
    ranges that newer writes cut back.  Random overlapping writes and zeroes,
    then a roll-back: the read plan must name, for every block, the newest
    copy (its file offset and CRC) or a hole, as a per-block reference does."""
    from lsbd.segments import journal
    from lsbd.plans.reads import overlay

    monkeypatch.setattr(journal, "BIG_RANGE", big_range)
    rng = random.Random(7)
    n = 64
    for trial in range(60):
        seg = OpenSegment(str(tmp_path / f"j{trial}"), volume_id=VOLID, seq=5, block_size=BS)
        ref: dict[int, object] = {}

        def apply(undo, seg=seg, ref=ref):
            lba = rng.randrange(n)
            count = rng.randrange(1, min(40, n - lba) + 1)
            if rng.random() < 0.7:
                data = os.urandom(count * BS)
                crcs = block_crcs(data, BS)
                seg.append(DATA, lba, count, data=data, crcs=crcs, undo=undo)
                first = seg.records[-1].data_offset
                for i in range(count):
                    ref[lba + i] = (first + i * BS, struct.unpack_from("<I", crcs, 4 * i)[0])
            else:
                seg.append(ZERO, lba, count, undo=undo)
                ref.update(dict.fromkeys(range(lba, lba + count), "hole"))

        def plan(seg=seg, ref=ref):
            lo = rng.randrange(n)
            hi = rng.randrange(lo + 1, n + 1)
            got, pos = {}, lo
            for lba, count, source, off, crcs in overlay([(lo, hi - lo, None, 0, None)],
                                                         seg, lo, hi - lo, BS):
                assert lba == pos
                pos += count
                for i in range(count):
                    got[lba + i] = "hole" if source is None else (off + i * BS, crcs[i])
            assert pos == hi
            return {b: got[b] for b in range(lo, hi)}, {b: ref.get(b, "hole")
                                                        for b in range(lo, hi)}

        for _ in range(rng.randrange(1, 30)):
            apply(None)
        got, want = plan()
        assert got == want
        before = dict(ref)
        mark = seg.mark()
        for _ in range(rng.randrange(1, 10)):
            apply(mark[2])
        seg.rollback(mark)
        ref.clear()
        ref.update(before)
        for _ in range(3):
            got, want = plan()
            assert got == want
        seg.discard()


def test_a_damaged_block_in_the_open_journal_is_named_not_returned(make_volume):
    """Reads of blocks not yet sealed come from the journal file, checked
    against the CRCs kept in memory: a run of them at once, and one alone."""
    vol = make_volume()
    data = blocks(1, 0, 64)
    vol.write(0, data)                       # a large record: a range in the index
    vol.write(100 * BS, block(2, 100))        # a small one: a block entry
    rec_big, rec_small = testing.journal(vol).records
    with open(testing.journal(vol).path, "r+b") as f:
        for bad in (rec_big.data_offset + 5 * BS + 17, rec_small.data_offset + 3):
            f.seek(bad)
            byte = f.read(1)
            f.seek(bad)
            f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CorruptionError) as err:
        vol.read(0, 64 * BS)
    assert err.value.offset == rec_big.data_offset + 5 * BS
    assert vol.read(0, 5 * BS) == data[:5 * BS]        # the blocks before it are good
    with pytest.raises(CorruptionError):
        vol.read(100 * BS, BS)


def test_bulk_unmasking_matches_one_at_a_time():
    from lsbd.format import segment
    from lsbd.format.segment import pack_masked, unmask_packed

    rng = random.Random(3)
    for n in (0, 1, 7, 8, 9, 256, 257, 8192, 8191 + 3000):
        raw = [rng.getrandbits(32) for _ in range(n)]
        raw[:2] = [0, 0xFFFFFFFF][:n]               # the edge values, where there is room
        masked = pack_masked(raw)
        assert masked == struct.pack(f"<{n}I", *map(mask, raw))
        assert list(unmask_packed(masked)) == [unmask(m) for m in struct.unpack(f"<{n}I", masked)]
        assert list(unmask_packed(masked)) == raw
    assert max(segment._LANES) <= 256     # long arrays go in chunks: the cache stays small


def test_unfilled_read_buffers_are_whole_writable_bytearrays(tmp_path, in_page_cache):
    from lsbd.segments import openfile
    from lsbd.linux import unfilled_bytearray

    for n in (4096, 1 << 20):
        buf = unfilled_bytearray(n)
        assert type(buf) is bytearray and len(buf) == n
        buf[-1] = 7
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    in_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert openfile.pread(fd, 1 << 20, 0, nowait=True) == data
    finally:
        os.close(fd)


def test_recovery_gives_back_the_reservation_of_a_segment_sealed_before_a_crash(tmp_path):
    path = str(tmp_path / "journal")
    seg = OpenSegment(path, volume_id=VOLID, seq=3, block_size=BS, expected_size=4 * MiB)
    seg.append(DATA, 0, 2, data=blocks(1, 0, 2), crcs=block_crcs(blocks(1, 0, 2), BS),
               commit=True)
    trailer = seg.seal(SIZE, 0)
    seg.close_fd()                   # the crash: sealed, never synced and finished
    before = os.stat(path)
    if _can_preallocate(str(tmp_path)):
        assert before.st_blocks * 512 >= 4 * MiB
    got, records = _recover(path, volume_id=VOLID, seq=3, block_size=BS, volume_size=SIZE)
    assert got == trailer and [r.lba for r in records] == [0]
    after = os.stat(path)
    assert after.st_size == before.st_size
    assert after.st_blocks * 512 <= after.st_size + 64 * 1024


_EXIT_WITHOUT_CLOSE = """
import sys, time
from lsbd.meta.config import create_volume
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.store.faulty import FaultyStore
from lsbd.store.local import LocalStore

root = sys.argv[1]
store = FaultyStore(LocalStore(root + "/store"))
create_volume(store, "vol", 1 << 24)
store.fail(op="put", key_prefix="volumes/vol/seg/", times=None)   # the store is down
vol = Volume.open(store, "vol", cache_root=root + "/cache")
vol.write(0, b"x" * 8192)
testing.seal_now(vol)
deadline = time.monotonic() + 20
while testing.upload_error(vol) is None and time.monotonic() < deadline:
    time.sleep(0.05)
assert testing.upload_error(vol) is not None, "the upload never failed"
print("exiting", flush=True)
# No close(): the process just ends.
"""


def test_a_process_ends_with_a_volume_left_open_while_the_store_is_down(tmp_path):
    """The uploader retries a failing store for ever while its volume is
    open; a process that ends without closing the volume must still end
    (the segment stays in the cache dir for the next open)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout
    cached = [f for _root, _dirs, files in os.walk(tmp_path / "cache") for f in files
              if f.endswith(".seg")]
    assert cached, "the segment that was not uploaded is kept"
