"""Reads of many pieces (lsbd.segments.spans, SegmentFiles.read_batch): a
read that stitches its blocks from many places returns exactly what was
written, with nearby pieces read by one call, every piece checked, and a
cold read handing the disk all of its pieces at once."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from typing import Callable

import pytest
from engine_helpers import BS, MiB, block, open_test_store, overwrite

from lsbd.crypto import keyring as kr
from lsbd.crypto import keystore
from lsbd.crypto.aead import Argon2Params, random_bytes
from lsbd.crypto.store import TAIL_READ
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.errors import CorruptionError, WouldBlock
from lsbd.meta.config import create_volume
from lsbd.segments import openfile
from lsbd.segments import spans
from lsbd.segments.local import SegmentFiles
from lsbd.store import open_store

SIZE = 8 * MiB


SECRET = kr.Secret(kr.PASSPHRASE, b"read batch test passphrase")


def _open(tmp_path, kind: str = "plain") -> Volume:
    """A volume of 256 KiB segments: plain, compressed, or encrypted (its
    cache dir encrypted at rest too)."""
    if kind == "plain":
        store = open_test_store("file://" + str(tmp_path / "store"))
        options = {}
    else:
        store = open_store("file://" + str(tmp_path / "store"), secret=lambda _v: SECRET)
        options = {"compression": "zstd:1"}
        if kind == "encrypted":
            keystore.save(store.inner, "vol", kr.new_keyring(
                random_bytes(16), SECRET,
                params=Argon2Params(memory_kib=64, iterations=1, lanes=1)))
            options["encryption"] = "aes-256-gcm"
    create_volume(store, "vol", SIZE, segment_size=256 * 1024, seal_interval=3600, **options)
    return Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))


@pytest.fixture
def vol(tmp_path):
    v = _open(tmp_path)
    yield v
    v.close()
    v.store.close()


def test_spans_join_nearby_pieces_only():
    pieces = [(100_000, 1), (0, 2), (2 * BS + 28, 1), (3 * BS + 56 + spans.SPAN_GAP + 1, 1)]
    assert spans.coalesce(pieces, BS) == [
        (0, 3 * BS + 28, [(0, 2), (2 * BS + 28, 1)]),
        (3 * BS + 56 + spans.SPAN_GAP + 1, 4 * BS + 56 + spans.SPAN_GAP + 1,
         [(3 * BS + 56 + spans.SPAN_GAP + 1, 1)]),
        (100_000, 100_000 + BS, [(100_000, 1)]),
    ]
    far = [(i * 2 * BS, 1) for i in range(2 * spans.SPAN_MAX // (2 * BS) + 1)]
    assert len(spans.coalesce(far, BS)) == 3         # a span stops at SPAN_MAX


def test_pieces_far_apart_are_found_as_their_spans_would_be():
    """apart() gives the offsets of pieces that would each be a span of one
    block (one pread each), and None whenever coalesce() would join two or
    a piece is longer than a block."""
    rng = random.Random(3)
    for _ in range(300):
        pieces = [(rng.randrange(0, 4 * spans.SPAN_MAX, 4), rng.choice([1, 1, 1, 1, 1, 2]))
                  for _ in range(rng.randrange(1, 8))]
        spans_of = spans.coalesce(pieces, BS)
        singles = all(n == 1 for _o, n in pieces) and len(spans_of) == len(pieces)
        offsets = spans.apart(pieces, BS)
        assert offsets == ([start for start, _end, _m in spans_of] if singles else None), pieces
    gap = spans.SPAN_GAP + BS
    assert spans.apart([(gap + 1, 1), (0, 1)], BS) == [0, gap + 1]
    assert spans.apart([(gap, 1), (0, 1)], BS) is None


def _reads(vol, model: bytearray, rng: random.Random, count: int) -> None:
    for _ in range(count):
        length = rng.choice([MiB, 256 * 1024, 3 * BS + 100, 64 * 1024])
        off = rng.randrange(0, SIZE - length + 1)
        if rng.random() < 0.5:
            off -= off % BS
        assert vol.read(off, length) == bytes(model[off:off + length]), (off, length)


def _record_one_by_one(monkeypatch) -> list:
    """The (seq, offset) of every read that goes one piece at a time
    (SegmentFiles.read_blocks), not in a batch."""
    calls: list = []
    real = SegmentFiles.read_blocks

    def read_blocks(self, seq, offset, nblocks, **kw):
        calls.append((seq, offset))
        return real(self, seq, offset, nblocks, **kw)

    monkeypatch.setattr(SegmentFiles, "read_blocks", read_blocks)
    return calls


@pytest.mark.parametrize("kind", ["plain", "compressed", "encrypted"])
def test_scattered_reads_match_a_model(tmp_path, monkeypatch, kind):
    """Random writes, some sealed and some still in journals, read back in
    long reads, then again after read-directed defragmentation moved them."""
    vol = _open(tmp_path, kind)
    one_by_one = _record_one_by_one(monkeypatch)
    try:
        _model_run(vol, one_by_one)
    finally:
        vol.close()
        vol.store.close()


def _model_run(vol, one_by_one: list) -> None:
    rng = random.Random(7)
    model = bytearray(SIZE)
    data = rng.randbytes(4 * MiB)
    vol.write(0, data)
    model[:4 * MiB] = data
    overwrite(vol, model, rng, 4 * MiB, amount=2 * MiB)
    testing.seal_now(vol)
    assert len(vol.map_extents(0, 256)) > 20
    assert vol.read(0, MiB) == bytes(model[:MiB])
    assert not one_by_one      # every piece read in a batch (decrypted, on an encrypted volume)
    overwrite(vol, model, rng, 6 * MiB, amount=128 * 1024)   # newer, in the open journal
    vol.trim(MiB + 5 * BS, 3 * BS)
    model[MiB + 5 * BS:MiB + 8 * BS] = bytes(3 * BS)
    _reads(vol, model, rng, 60)
    assert testing.read_defrag(vol).drain()
    testing.seal_now(vol)
    _reads(vol, model, rng, 60)
    assert vol.usage()["read_defrag_bytes"] > 0


def _interleaved(vol) -> bytes:
    """Blocks 0..255 written even ones first, then odd ones: each segment
    holds every other block, in order, so a 1 MiB read is 256 pieces in a
    few files, each piece next to the one before it in its file."""
    for lba in list(range(0, 256, 2)) + list(range(1, 256, 2)):
        vol.write(lba * BS, block(1, lba))
    testing.seal_now(vol)
    return b"".join(block(1, lba) for lba in range(256))


def test_nearby_pieces_are_read_with_one_call(vol, monkeypatch):
    testing.stop_read_defrag(vol)
    expected = _interleaved(vol)
    assert len(vol.map_extents(0, 256)) == 256
    calls = []
    real = openfile.pread

    def counting(fd, length, offset, nowait):
        calls.append(length)
        return real(fd, length, offset, nowait)

    monkeypatch.setattr(openfile, "pread", counting)
    assert vol.read(0, MiB) == expected
    segments = {e.seq for e in vol.map_extents(0, 256)}
    assert len(calls) <= 2 * len(segments), calls       # not one call per block


def _a_damaged_block_fails_the_read(vol, lba: int) -> None:
    """One byte of block `lba`'s copy damaged in its segment file: a read
    of the first MiB fails with EIO, naming the damaged piece."""
    e = vol.map_extents(lba, 1)[0]
    path = os.path.join(vol.folder, "segments", f"{e.seq:016x}.seg")
    with open(path, "r+b") as f:          # the store's object too: the same file here
        f.seek(e.offset + 100)
        byte = f.read(1)
        f.seek(e.offset + 100)
        f.write(bytes([byte[0] ^ 0x5A]))
    with pytest.raises(CorruptionError) as err:
        vol.read(0, MiB)
    assert err.value.errno == errno.EIO and err.value.offset == e.offset


def test_a_damaged_block_in_a_span_is_an_io_error(vol):
    testing.stop_read_defrag(vol)
    _interleaved(vol)
    _a_damaged_block_fails_the_read(vol, 77)


def test_a_cold_read_asks_for_all_its_pieces_at_once(vol, monkeypatch):
    """A blocking read hands every file's pieces to the kernel before it
    waits for any; a nowait read gives up at the first miss having asked
    for nothing (the caller runs it again where it may wait)."""
    testing.stop_read_defrag(vol)
    expected = _interleaved(vol)
    segments = {e.seq for e in vol.map_extents(0, 256)}
    assert vol.read(0, MiB) == expected          # the segments' indexes loaded
    real_preadv, real_pread = os.preadv, os.pread
    asked: list[tuple[int, int]] = []
    waited: list[int] = []
    # os is one module for every thread: only this thread's reads count, not
    # a background thread's (the lease's renewal reads its object with pread).
    reader = threading.get_ident()

    def cold_preadv(fd, buffers, offset, flags=0):
        if threading.get_ident() != reader:
            return real_preadv(fd, buffers, offset, flags)
        if flags & os.RWF_NOWAIT:
            raise BlockingIOError(errno.EAGAIN, "would block")
        waited.append(len(asked))
        return real_preadv(fd, buffers, offset, flags)

    def cold_pread(fd, length, offset):
        if threading.get_ident() == reader:
            waited.append(len(asked))
        return real_pread(fd, length, offset)

    real_fadvise = os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        if threading.get_ident() != reader:
            return real_fadvise(fd, offset, length, advice)
        assert advice == os.POSIX_FADV_WILLNEED
        asked.append((fd, offset))

    monkeypatch.setattr(openfile, "_RWF_NOWAIT", os.RWF_NOWAIT)   # whatever a file system before said
    monkeypatch.setattr(openfile.os, "preadv", cold_preadv)
    monkeypatch.setattr(openfile.os, "pread", cold_pread)
    monkeypatch.setattr(spans.os, "posix_fadvise", fadvise)
    with pytest.raises(WouldBlock):
        vol.read(0, MiB, nowait=True)
    assert asked == [] and waited == []
    assert vol.read(0, MiB) == expected                       # the blocking read
    assert len({fd for fd, _ in asked}) == len(segments)
    assert waited and waited[0] == len(asked)                 # every file, before any wait


def test_a_segment_read_ahead_whole_is_advised_all_of_it(tmp_path, monkeypatch):
    """will_need_whole hands the kernel the whole file, in pieces that cover
    it (one call for all of it started reading only its first read-ahead
    window)."""
    path = tmp_path / "seg"
    path.write_bytes(bytes(3 * MiB + 5))
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda _fd, off, n, _advice: asked.append((off, n)))
    fd = os.open(path, os.O_RDONLY)
    try:
        spans.will_need_whole(fd)
    finally:
        os.close(fd)
    assert len(asked) > 1 and asked[0][0] == 0
    assert all(a + n == b for (a, n), (b, _m) in zip(asked, asked[1:]))
    assert asked[-1][0] + asked[-1][1] == 3 * MiB + 5


def _evicted(vol, seqs: set[int]) -> None:
    """Every one of these segments stored, and its local copy evicted: its
    reads go to the store (a compressed volume's, frame by frame)."""
    files = testing.local_files(vol)
    for seq in seqs:
        assert testing.wait_stored(vol, seq)
    deadline = time.monotonic() + 10
    while any(files.is_local(seq) for seq in seqs):    # adopted just after it is stored
        assert time.monotonic() < deadline
        for seq in seqs:
            files.forget(seq)      # the local copy only: the store's stays
        time.sleep(0.01)


def test_a_read_of_evicted_segments_reads_each_spans_frames_once(tmp_path, monkeypatch):
    """A compressed volume on a store in a local directory, its segments
    evicted from the cache: a 1 MiB read of 256 pieces asks the store once
    per span of nearby pieces (and once per index), not once per piece,
    and reads back what was written, after read-directed defragmentation
    too."""
    vol = _open(tmp_path, "compressed")
    try:
        testing.stop_read_defrag(vol)
        expected = _interleaved(vol)
        seqs = {e.seq for e in vol.map_extents(0, 256)}
        assert len(seqs) >= 3
        away = set(sorted(seqs)[::2])        # the others stay local
        _evicted(vol, away)
        inner = vol.store.inner
        asked: list[tuple[str, int]] = []
        real_get, real_get_ranges = type(inner).get, type(inner).get_ranges

        def get(self, key, start=0, length=None):
            if "/seg/" in key:
                asked.append((key, start))
            return real_get(self, key, start, length)

        def get_ranges(self, key, ranges):
            if "/seg/" in key:
                asked.extend((key, start) for start, _length in ranges)
            return real_get_ranges(self, key, ranges)

        monkeypatch.setattr(type(inner), "get", get)
        monkeypatch.setattr(type(inner), "get_ranges", get_ranges)
        one_by_one = _record_one_by_one(monkeypatch)
        assert vol.read(0, MiB) == expected
        assert not one_by_one                      # every piece read in a span
        assert asked and len(asked) <= 4 * len(away), (len(asked), len(away))
        assert {key[-16:] for key, _start in asked} == {f"{seq:016x}" for seq in away}
        with pytest.raises(WouldBlock):
            vol.read(0, MiB, nowait=True)          # the store is never read inline
    finally:
        vol.close()
        vol.store.close()


@pytest.mark.parametrize("kind", ["plain", "compressed"])
def test_a_stored_segments_far_apart_pieces_are_read_by_one_call_to_the_store(
        tmp_path, monkeypatch, kind):
    """After random writes a read finds a few blocks of each stored segment,
    too far apart to share a span: all the spans of a segment are asked of
    the store in one call (get_ranges: one way through its layers, one
    descriptor), never a get each, and read back what was written."""
    from lsbd.store.local import LocalStore

    vol = _open(tmp_path, kind)
    try:
        testing.stop_read_defrag(vol)
        for lba in range(256):      # each block of the read 5 blocks from the next
            vol.write(lba * BS, block(2, lba))
            for k in range(5):
                vol.write((256 + 5 * lba + k) * BS, block(3, lba))
        testing.seal_now(vol)
        seqs = {e.seq for e in vol.map_extents(0, 256)}
        _evicted(vol, seqs)
        calls: list[tuple[str, int]] = []
        spans: list[tuple[str, int]] = []
        real_get, real_get_ranges = LocalStore.get, LocalStore.get_ranges

        def get(self, key, start=0, length=None):
            if "/seg/" in key and start >= 0 and length is not None:
                spans.append((key, start))
            return real_get(self, key, start, length)

        def get_ranges(self, key, ranges):
            calls.append((key, len(ranges)))
            return real_get_ranges(self, key, ranges)

        monkeypatch.setattr(LocalStore, "get", get)
        monkeypatch.setattr(LocalStore, "get_ranges", get_ranges)
        assert vol.read(0, MiB) == b"".join(block(2, lba) for lba in range(256))
        keys = [key for key, _n in calls]
        assert {key[-16:] for key in keys} == {f"{seq:016x}" for seq in seqs}
        assert len(keys) == len(set(keys)), calls              # one call a segment
        assert sum(n for _key, n in calls) >= 200, calls       # of many spans each
        # gets of a range: at most a segment's trailer (where its data ends)
        assert len(spans) <= len(seqs), spans
    finally:
        vol.close()
        vol.store.close()


def test_stats_count_the_bytes_read_from_local_copies_and_from_the_store(tmp_path):
    """`lsbd stats` says how many bytes of sealed blocks reads took from the
    cache dir's copies and how many from the store: a 1 MiB read of pieces
    of several segments, some evicted, counts each piece once, where it came
    from (stored blocks read with their records' headers, or by their
    segment's index)."""
    vol = _open(tmp_path, "compressed")
    try:
        testing.stop_read_defrag(vol)
        expected = _interleaved(vol)
        extents = vol.map_extents(0, 256)
        seqs = {e.seq for e in extents}
        away = set(sorted(seqs)[::2])
        _evicted(vol, away)
        from_store = sum(e.nblocks for e in extents if e.seq in away) * BS
        assert 0 < from_store < MiB
        files = testing.local_files(vol)
        for indexed in (False, True):     # the stored blocks read as records, then by index
            if indexed:
                for seq in away:
                    files._remote_index(seq)
            before = vol.usage()
            assert vol.read(0, MiB) == expected
            after = vol.usage()
            assert after["store_read_bytes"] - before["store_read_bytes"] == from_store
            assert after["local_read_bytes"] - before["local_read_bytes"] == MiB - from_store
        alone = [next(e for e in extents if e.seq in away),
                 next(e for e in extents if e.seq not in away)]
        for e in alone:                 # a block alone: the short path
            before = vol.usage()
            assert vol.read(e.lba * BS, BS) == expected[e.lba * BS:(e.lba + 1) * BS]
            after = vol.usage()
            where = "store" if e.seq in away else "local"
            assert after[f"{where}_read_bytes"] - before[f"{where}_read_bytes"] == BS
    finally:
        vol.close()
        vol.store.close()


@pytest.mark.parametrize("kind", ["compressed", "encrypted"])
def test_evicted_one_block_records_are_read_without_their_index(tmp_path, monkeypatch, kind):
    """Blocks of evicted segments whose index is not in memory, each a
    whole one-block record, are read with their record's header and CRC and
    checked against them: no index is loaded for them (after random writes
    over a large volume, a read finds a block or two of each of thousands
    of segments).  Blocks inside a longer record are read against the
    index.  Everything reads back as written."""
    from lsbd.segments import copies

    vol = _open(tmp_path, kind)
    try:
        testing.stop_read_defrag(vol)
        rng = random.Random(11)
        model = bytearray(rng.randbytes(32 * BS))
        vol.write(0, bytes(model))                 # one record of 32 blocks
        testing.seal_now(vol)
        long_seqs = {e.seq for e in vol.map_extents(0, 32)}
        model += bytes(224 * BS)
        for lba in list(range(1, 32, 2)) + rng.sample(range(32, 256), 150):
            b = rng.randbytes(BS)
            vol.write(lba * BS, b)
            model[lba * BS:(lba + 1) * BS] = b
        testing.seal_now(vol)
        extents = vol.map_extents(0, 256)
        seqs = {e.seq for e in extents}
        short_seqs = seqs - long_seqs
        assert len(short_seqs) >= 2 and long_seqs <= seqs
        _evicted(vol, seqs)
        loaded = []
        real = copies.fetch_footer_by_key

        def fetch_footer_by_key(store, key, seq, *a, **kw):
            loaded.append(seq)
            return real(store, key, seq, *a, **kw)

        monkeypatch.setattr(copies, "fetch_footer_by_key", fetch_footer_by_key)
        one_by_one = _record_one_by_one(monkeypatch)
        assert vol.read(0, MiB) == bytes(model)
        assert set(loaded) == long_seqs            # only the longer record's segment
        assert not one_by_one
        assert vol.read(0, MiB) == bytes(model)    # again: trailers and the index kept
        assert sorted(loaded) == sorted(long_seqs)
    finally:
        vol.close()
        vol.store.close()


@pytest.mark.parametrize("kind", ["plain", "compressed"])
def test_a_stored_object_that_holds_another_segment_is_an_io_error(tmp_path, kind):
    """A segment's object replaced by another segment's (the same layout of
    one-block records, so every record at the offsets read holds): the
    read fails, and does not return the other segment's blocks (its
    trailer names another seq; a compressed object's frames are also bound
    to their name)."""
    vol = _open(tmp_path, kind)
    try:
        testing.stop_read_defrag(vol)
        _interleaved(vol)
        extents = vol.map_extents(0, 256)
        seqs = sorted({e.seq for e in extents})
        _evicted(vol, set(seqs))
        victim, other = seqs[0], seqs[1]
        objects = {name: os.path.join(d, name) for d, _dirs, names in os.walk(tmp_path / "store")
                   for name in names}
        src, dst = objects[f"{other:016x}"], objects[f"{victim:016x}"]
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
        testing.local_files(vol).forget(victim)          # nothing kept about the old object
        first = min(e.lba for e in extents if e.seq == victim)
        with pytest.raises(CorruptionError):
            vol.read(first * BS, 64 * 1024)
    finally:
        vol.close()
        vol.store.close()


def test_a_damaged_block_in_a_stored_span_is_an_io_error(tmp_path, monkeypatch):
    """A block of a stored span that fails its check (damaged past the
    frame's own check) is read again a piece at a time, which names the bad
    block: the read fails, nothing wrong is returned."""
    vol = _open(tmp_path, "compressed")
    try:
        testing.stop_read_defrag(vol)
        _interleaved(vol)
        seqs = {e.seq for e in vol.map_extents(0, 256)}
        _evicted(vol, seqs)
        e = vol.map_extents(77, 1)[0]
        bad_key = f"/seg/{e.seq:016x}"
        real_get, real_get_ranges = type(vol.store).get, type(vol.store).get_ranges

        def damaged(key, start, length, data):
            if key.endswith(bad_key) and length and start <= e.offset + 100 < start + length:
                data = bytearray(data)
                data[e.offset + 100 - start] ^= 0x5A
            return data

        def get(self, key, start=0, length=None):
            return damaged(key, start, length, real_get(self, key, start, length))

        def get_ranges(self, key, ranges):
            return [damaged(key, start, length, data) for (start, length), data
                    in zip(ranges, real_get_ranges(self, key, ranges))]

        monkeypatch.setattr(type(vol.store), "get", get)
        monkeypatch.setattr(type(vol.store), "get_ranges", get_ranges)
        with pytest.raises(CorruptionError) as err:
            vol.read(0, MiB)
        assert err.value.errno == errno.EIO and err.value.offset == e.offset
    finally:
        vol.close()
        vol.store.close()


def test_a_sequential_reader_has_dense_segments_read_ahead_whole(vol, monkeypatch):
    """After random writes over a range, a sequential reader of it finds a
    few blocks of each of the same segments in every read: those segments
    are read ahead whole, once each; a read that does not continue the one
    before, or that finds only a few pieces of a segment, asks for nothing
    more than its pieces."""
    from lsbd.segments import local

    testing.stop_read_defrag(vol)
    rng = random.Random(3)
    order = list(range(512))
    rng.shuffle(order)
    for lba in order:                      # 2 MiB written at random: 8 segments of 64 blocks
        vol.write(lba * BS, block(2, lba))
    sparse = [0, 200, 330, 460]            # then one block in each read: a sparse segment
    for lba in sparse:
        vol.write(lba * BS, block(3, lba))
    testing.seal_now(vol)
    advised: list[int] = []
    fd_seq: dict[int, int] = {}
    real_acquire = SegmentFiles._acquire

    def acquire(self, seq):
        f = real_acquire(self, seq)
        if f is not None:
            fd_seq[f.fd] = seq
        return f

    monkeypatch.setattr(SegmentFiles, "_acquire", acquire)
    monkeypatch.setattr(spans, "will_need_whole", lambda fd: advised.append(fd_seq[fd]))
    advice = testing.local_files(vol).whole_advice
    expected = [block(3 if lba in sparse else 2, lba) for lba in range(512)]
    assert vol.read(256 * 1024, 256 * 1024) == b"".join(expected[64:128])
    advice.drain()
    assert advised == []                   # the first read continues nothing
    got = [vol.read(off, 256 * 1024) for off in range(512 * 1024, 2 * MiB, 256 * 1024)]
    assert b"".join(got) == b"".join(expected[128:])
    advice.drain()                         # advised on a thread of its own
    assert testing.open_file_uses(vol) == 0   # each file held until advised, no longer
    dense = set()
    for off in range(512 * 1024, 2 * MiB, 256 * 1024):
        pieces: dict[int, int] = {}
        for e in vol.map_extents(off // BS, 64):
            pieces[e.seq] = pieces.get(e.seq, 0) + 1
        dense |= {seq for seq, n in pieces.items() if n >= local.WHOLE_FROM}
    assert len(dense) >= 4
    assert vol.map_extents(200, 1)[0].seq not in dense
    assert sorted(advised) == sorted(dense)        # each dense segment once, no other
    advised.clear()
    assert vol.read(0, 256 * 1024) == b"".join(expected[:64])    # not sequential
    advice.drain()
    assert advised == []


def test_files_read_ahead_whole_are_advised_on_a_thread_and_let_go_after(monkeypatch):
    """WholeAdvice advises each file handed to it on a thread of its own,
    in turn, and lets each go only once advised (its descriptor stays
    open until then); closed, it advises what was queued and takes no
    more."""
    from lsbd.segments.advice import WholeAdvice

    go = threading.Event()
    advised: list[int] = []
    released: list[int] = []

    def will_need_whole(fd):
        assert go.wait(10)
        advised.append(fd)

    monkeypatch.setattr(spans, "will_need_whole", will_need_whole)

    class Held:
        def __init__(self, fd):
            self.fd = fd

    advice = WholeAdvice(lambda f: released.append(f.fd))
    assert advice.put(Held(3)) and advice.put(Held(4))      # type: ignore[arg-type]
    time.sleep(0.05)
    assert advised == [] and released == []     # the caller did not wait for the advice
    go.set()
    advice.drain()
    assert advised == [3, 4] and released == [3, 4]
    assert advice.put(Held(5))                  # type: ignore[arg-type]
    advice.close()
    assert advised == [3, 4, 5] and released == [3, 4, 5]
    assert not advice.put(Held(6))              # type: ignore[arg-type]
    assert released == [3, 4, 5]


def test_long_reads_from_a_local_store_run_two_at_a_time(vol, monkeypatch):
    """On a volume whose store is a local directory, at most
    STITCHED_AT_ONCE long reads run at once: a third waits for one of them
    (a nowait one is refused), while a one-block read goes on; each reads
    back what was written."""
    from lsbd.engine import reader as reader_mod

    testing.stop_read_defrag(vol)
    for lba in range(64):
        vol.write(lba * BS, block(4, lba))
    testing.seal_now(vol)
    expected = b"".join(block(4, lba) for lba in range(64))
    lock = threading.Lock()
    running = [0, 0]          # now, most at once
    go = threading.Event()
    real = reader_mod.Reader.read_runs

    def read_runs(self, runs, nowait=False, sequential=False):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        try:
            go.wait(10)
            return real(self, runs, nowait, sequential)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(reader_mod.Reader, "read_runs", read_runs)
    got: list = [None] * 3

    def long_read(i):
        got[i] = vol.read(i * 16 * BS, 32 * BS)

    threads = [threading.Thread(target=long_read, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while running[0] < reader_mod.STITCHED_AT_ONCE and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert running == [2, 2]                       # the third waits at the gate
    with pytest.raises(WouldBlock):
        vol.read(0, 64 * 1024, nowait=True)
    assert vol.read(5 * BS, BS) == block(4, 5)     # one block: not gated
    go.set()
    for t in threads:
        t.join(10)
    assert running[1] == 2
    assert got == [expected[i * 16 * BS:(i * 16 + 32) * BS] for i in range(3)]


def test_a_volume_says_its_long_reads_run_best_in_turn_only_on_a_local_store(tmp_path):
    """long_reads_in_turn (BlockDevice): True when the store is a local
    directory (long reads are processor work), False for any other store
    (they wait on the network and should overlap); a past view says the
    same as its volume."""
    from engine_helpers import RecordingStore

    class Distant(RecordingStore):
        @property
        def url(self) -> str:  # type: ignore[override]
            return "s3://bucket/far"

    local = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(local, "vol", SIZE, segment_size=256 * 1024)
    for store, expected in ((local, True), (Distant(local), False)):
        for read_only in (False, True):
            vol = Volume.open(store, "vol", cache_root=str(tmp_path / f"cache-{expected}"),
                              read_only=read_only)
            try:
                assert vol.long_reads_in_turn is expected
            finally:
                vol.close()
    local.close()


def test_a_damaged_block_alone_in_its_span_is_an_io_error(vol):
    """Pieces of a read far apart in their files (random writes between
    them) are each a span of one block, checked alone: a damaged one fails
    the read, naming the block."""
    testing.stop_read_defrag(vol)
    for lba in range(256):
        vol.write(lba * BS, block(1, lba))
        for j in range(5):          # 5 records between two pieces: past SPAN_GAP
            vol.write((256 + 5 * lba + j) * BS, block(2, lba))
    testing.seal_now(vol)
    extents = vol.map_extents(0, 256)
    assert len(extents) == 256
    seq_pieces = sorted((e.seq, e.offset) for e in extents)
    assert all(s1 != s2 or o2 - o1 > spans.SPAN_GAP + BS
               for (s1, o1), (s2, o2) in zip(seq_pieces, seq_pieces[1:]))
    assert vol.read(0, MiB) == b"".join(block(1, lba) for lba in range(256))
    _a_damaged_block_fails_the_read(vol, 77)


def test_pieces_far_apart_are_read_by_one_loop_a_file(vol, monkeypatch):
    """A read whose pieces lie far apart in their files (random writes
    between them) reads each file's pieces with one read_apart() call (a
    pread each, made by a C loop), none one span at a time, and returns
    what was written: from the page cache, and from a cold one (each
    file's pieces handed to the kernel before any read waits)."""
    testing.stop_read_defrag(vol)
    for lba in range(256):
        vol.write(lba * BS, block(1, lba))
        for j in range(5):          # 5 records between two pieces: past SPAN_GAP
            vol.write((256 + 5 * lba + j) * BS, block(2, lba))
    testing.seal_now(vol)
    expected = b"".join(block(1, lba) for lba in range(256))
    segments = {e.seq for e in vol.map_extents(0, 256)}
    assert len(segments) > 1
    apart_calls: list[int] = []
    real_apart = openfile.OpenFile.read_apart

    def read_apart(self, length, offsets, nowait):
        apart_calls.append(len(offsets))
        return real_apart(self, length, offsets, nowait)

    monkeypatch.setattr(openfile.OpenFile, "read_apart", read_apart)
    monkeypatch.setattr(openfile, "pread", None)      # no span read one at a time
    assert vol.read(0, MiB) == expected
    assert len(apart_calls) == len(segments) and sum(apart_calls) == 256
    apart_calls.clear()
    real_preadv, real_pread = os.preadv, os.pread
    reader = threading.get_ident()
    asked: set[int] = set()
    waited: list[int] = []

    def cold_preadv(fd, buffers, offset, flags=0):
        if flags and threading.get_ident() == reader:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real_preadv(fd, buffers, offset, flags)

    def cold_pread(fd, length, offset):
        if threading.get_ident() == reader:
            waited.append(len(asked))
        return real_pread(fd, length, offset)

    real_fadvise = os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        if threading.get_ident() == reader:
            asked.add(fd)
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(openfile, "_RWF_NOWAIT", os.RWF_NOWAIT)
    monkeypatch.setattr(openfile.os, "preadv", cold_preadv)
    monkeypatch.setattr(openfile.os, "pread", cold_pread)
    monkeypatch.setattr(spans.os, "posix_fadvise", fadvise)
    assert vol.read(0, MiB) == expected       # a miss: every file advised, then read waiting
    assert len(apart_calls) == len(segments) + 1      # the one that missed, again
    assert len(asked) == len(segments) and waited and waited[0] == len(segments)


def _stored_and_cached(vol, model: bytearray) -> set[int]:
    """Random one-block writes over the first MiB, sealed into several
    segments, each stored and still in the cache dir; their seqs."""
    rng = random.Random(5)
    for lba in rng.sample(range(256), 200):
        b = rng.randbytes(BS)
        vol.write(lba * BS, b)
        model[lba * BS:(lba + 1) * BS] = b
    testing.seal_now(vol)
    seqs = {e.seq for e in vol.map_extents(0, 256)}
    for seq in seqs:
        assert testing.wait_stored(vol, seq)
    deadline = time.monotonic() + 10
    files = testing.local_files(vol)
    while any(seq not in files._cached for seq in seqs):    # adopted just after it is stored
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return seqs


@pytest.mark.parametrize("kind", ["compressed", "encrypted"])
def test_segments_evicted_from_the_cache_are_read_with_no_read_of_their_tails(
        tmp_path, monkeypatch, kind):
    """A segment the cache evicts leaves where its data ends behind (from its
    local copy's trailer), and a compressed segment's object layout is kept
    from when it was stored: reads of it from the store, one-block records
    without the index, then read only the blocks' own bytes, never the
    object's end.  What they read is what was written.  (A plain volume's
    segments are linked into a file:// store: never evicted.)"""
    vol = _open(tmp_path, kind)
    try:
        testing.stop_read_defrag(vol)
        model = bytearray(SIZE)
        seqs = _stored_and_cached(vol, model)
        assert len(seqs) >= 2
        files = testing.local_files(vol)
        assert files.make_room(1 << 62) is False      # every stored segment evicted
        assert not any(files.is_local(seq) for seq in seqs)
        inner = vol.store.inner
        asked: list[tuple[str, int, int | None]] = []
        real_get, real_tail = type(inner).get, type(inner).get_tail
        real_get_ranges = type(inner).get_ranges

        def get(self, key, start=0, length=None):
            if "/seg/" in key:
                asked.append((key, start, length))
            return real_get(self, key, start, length)

        def get_ranges(self, key, ranges):
            if "/seg/" in key:
                asked.extend((key, start, length) for start, length in ranges)
            return real_get_ranges(self, key, ranges)

        def get_tail(self, key, n, **kw):
            asked.append((key, -n, None))
            return real_tail(self, key, n, **kw)

        sealing_tail = type(vol.store).get_tail

        def sealed_tail(self, key, n, **kw):
            asked.append((key, -n, None))
            return sealing_tail(self, key, n, **kw)

        monkeypatch.setattr(type(inner), "get", get)
        monkeypatch.setattr(type(inner), "get_ranges", get_ranges)
        monkeypatch.setattr(type(inner), "get_tail", get_tail)
        monkeypatch.setattr(type(vol.store), "get_tail", sealed_tail)
        one_by_one = _record_one_by_one(monkeypatch)
        assert vol.read(0, MiB) == bytes(model[:MiB])
        assert not one_by_one
        assert asked                                   # from the store
        tails = [a for a in asked if a[1] < 0 or a[2] is None]
        assert not tails, tails
    finally:
        vol.close()
        vol.store.close()


def test_a_segment_found_not_local_is_not_looked_for_again_until_a_copy_comes(
        tmp_path, monkeypatch):
    """is_local remembers a segment it did not find in the cache dir (a
    read asks for every stored segment it touches); a copy fetched into the
    cache dir afterwards is found, and read from, at once."""
    from lsbd.segments import copies

    vol = _open(tmp_path, "compressed")
    try:
        testing.stop_read_defrag(vol)
        model = bytearray(SIZE)
        seqs = _stored_and_cached(vol, model)
        files = testing.local_files(vol)
        assert files.make_room(1 << 62) is False
        seq = min(seqs)
        looked: list[str] = []
        real_exists = copies.os.path.exists

        def exists(path):
            looked.append(path)
            return real_exists(path)

        monkeypatch.setattr(copies.os.path, "exists", exists)
        assert not files.is_local(seq)
        assert not files.is_local(seq)
        assert looked == [files.path(seq)]             # asked the file system once
        files._install(seq, vol.store.get(files.key_of(seq)))   # a copy comes back
        assert files.is_local(seq)
        real_get = type(vol.store).get
        asked = []

        def get(self, key, start=0, length=None):
            asked.append(key)
            return real_get(self, key, start, length)

        monkeypatch.setattr(type(vol.store), "get", get)
        assert vol.read(0, MiB) == bytes(model[:MiB])
        assert f"{seq:016x}" not in " ".join(asked)    # read from the copy
    finally:
        vol.close()
        vol.store.close()


def test_a_copy_that_comes_while_a_segment_is_looked_for_is_not_missed(tmp_path, monkeypatch):
    """A fetch that installs a segment's copy between is_local's look in
    the cache dir (not there yet) and its note of that: the note is not
    kept, and the next is_local finds the copy."""
    from lsbd.segments import copies

    vol = _open(tmp_path, "compressed")
    try:
        testing.stop_read_defrag(vol)
        seqs = _stored_and_cached(vol, bytearray(SIZE))
        files = testing.local_files(vol)
        assert files.make_room(1 << 62) is False
        seq = min(seqs)
        real_exists = copies.os.path.exists
        copy = vol.store.get(files.key_of(seq))

        def exists(path):
            found = real_exists(path)
            if path == files.path(seq) and not found:
                files._install(seq, copy)              # meanwhile
            return found

        monkeypatch.setattr(copies.os.path, "exists", exists)
        assert not files.is_local(seq)                 # looked before the copy came
        monkeypatch.setattr(copies.os.path, "exists", real_exists)
        assert files.is_local(seq)
    finally:
        vol.close()
        vol.store.close()


def _store_events(vol, monkeypatch) -> tuple[list[tuple], Callable[[str], int]]:
    """Every get (each range of a get_ranges as one) and will_need of a
    segment object that reaches the disk (the file:// store under the
    sealing), as ("get" | "will_need", key,
    (first byte, end)) in the order they came, and a function of a key
    giving the object's size."""
    from lsbd.store.local import LocalStore

    events: list[tuple] = []
    real_get, real_will_need = LocalStore.get, LocalStore.will_need
    real_get_ranges = LocalStore.get_ranges

    def absolute(self, key, start, length):
        size = os.path.getsize(self._path(key))
        if start < 0:
            return max(0, size + start), size
        return start, size if length in (None, 0) else min(size, start + length)

    def get(self, key, start=0, length=None):
        if "/seg/" in key:
            events.append(("get", key, absolute(self, key, start, length)))
        return real_get(self, key, start, length)

    def get_ranges(self, key, ranges):
        if "/seg/" in key:
            events.extend(("get", key, absolute(self, key, start, length))
                          for start, length in ranges)
        return real_get_ranges(self, key, ranges)

    def will_need(self, key, ranges):
        for start, length in ranges:
            events.append(("will_need", key, absolute(self, key, start, length)))
        return real_will_need(self, key, ranges)

    monkeypatch.setattr(LocalStore, "get", get)
    monkeypatch.setattr(LocalStore, "get_ranges", get_ranges)
    monkeypatch.setattr(LocalStore, "will_need", will_need)
    disk = vol.store
    while not isinstance(disk, LocalStore):
        disk = disk.inner
    return events, lambda key: os.path.getsize(disk._path(key))


@pytest.mark.parametrize("kind", ["compressed", "encrypted"])
def test_a_read_names_its_stored_pieces_to_the_store_before_it_reads_them(
        tmp_path, monkeypatch, kind):
    """A read that finds pieces in several stored segments names every one
    of them to the store (will_need: the disk reads them together) before
    it reads any: the frames that hold each range it then gets.  Where an
    object's layout is not known, its end first (its tail and index, all
    that its first read reads), all those read, then the frames named.
    What it reads is what was written, each piece checked."""
    vol = _open(tmp_path, kind)
    try:
        testing.stop_read_defrag(vol)
        rng = random.Random(7)   # blocks that do not compress: objects longer than their ends
        blocks = [rng.randbytes(BS) for _lba in range(256)]
        for lba in list(range(0, 256, 2)) + list(range(1, 256, 2)):
            vol.write(lba * BS, blocks[lba])
        testing.seal_now(vol)
        expected = b"".join(blocks)
        seqs = {e.seq for e in vol.map_extents(0, 256)}
        assert len(seqs) >= 2
        _evicted(vol, seqs)
        files = testing.local_files(vol)
        keys = {files.key_of(seq) for seq in seqs}
        events, size_of = _store_events(vol, monkeypatch)
        assert all(size_of(key) > 2 * TAIL_READ for key in keys)
        one_by_one = _record_one_by_one(monkeypatch)
        for attempt in ("layouts unknown", "layouts known"):
            if attempt == "layouts unknown":
                for key in keys:
                    vol.store._drop(key)
                files._data_ends.clear()
            events.clear()
            assert vol.read(0, MiB) == expected
            assert not one_by_one
            gets = [i for i, e in enumerate(events) if e[0] == "get"]
            assert {events[i][1] for i in gets} == keys, attempt
            for i in gets:            # each get's bytes named before it
                _get, key, (lo, hi) = events[i]
                assert any(e[0] == "will_need" and e[1] == key and e[2][0] <= lo
                           and hi <= e[2][1] for e in events[:i]), (attempt, events[i], events)
            before = events[:gets[0]]
            assert {key for kind_, key, _r in before if kind_ == "will_need"} == keys, attempt
            if attempt == "layouts unknown":      # the ends first: where the frames lie
                assert all(r[1] == size_of(key) for _n, key, r in before), before
            else:
                assert all(e[0] == "get" for e in events[gets[0]:]), events
    finally:
        vol.close()
        vol.store.close()


def test_a_read_of_one_stored_segment_names_nothing(tmp_path, monkeypatch):
    """A read whose stored pieces are all in one segment has nothing to read
    together: it names nothing to the store, and reads what was written."""
    vol = _open(tmp_path, "compressed")
    try:
        testing.stop_read_defrag(vol)
        for lba in list(range(0, 32, 2)) + list(range(1, 32, 2)):   # 32 pieces
            vol.write(lba * BS, block(3, lba))
        testing.seal_now(vol)
        assert len(vol.map_extents(0, 32)) == 32
        seqs = {e.seq for e in vol.map_extents(0, 32)}
        assert len(seqs) == 1
        _evicted(vol, seqs)
        events, _size_of = _store_events(vol, monkeypatch)
        assert vol.read(0, 32 * BS) == b"".join(block(3, lba) for lba in range(32))
        assert events and not [e for e in events if e[0] == "will_need"]
    finally:
        vol.close()
        vol.store.close()
