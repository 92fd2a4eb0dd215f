"""Segments of random writes sorted by block when sealed
(lsbd.segments.sortseal): which segments are sorted, that a sorted
segment reads back exactly what was written (from the cache dir, from the
store alone, after a crash), that the chain of trailers holds, and that a
read planned against the journal before the sort still reads right."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
from engine_helpers import BS, MiB, block, open_test_store, read_from_store, wipe

from lsbd.engine import sealer as sealer_module
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.format.segment import (
    DATA,
    FLAG_COMMIT,
    RESIZE,
    ZERO,
    Record,
    Trailer,
    block_crcs,
    encode_header,
    encode_record,
    read_sealed_index,
)
from lsbd.meta.config import create_volume
from lsbd.segments import sortseal
from lsbd.store import open_store

SIZE = 4 * MiB
NBLOCKS = SIZE // BS


def _rec(lba: int, n: int = 1, kind: int = DATA, flags: int = FLAG_COMMIT) -> Record:
    return Record(kind, flags, lba, n, 0, b"\0" * 4 * n if kind == DATA else b"")


def test_only_segments_of_random_one_transaction_writes_are_sorted(monkeypatch):
    monkeypatch.setattr(sortseal, "SORT_MIN_RECORDS", 4)
    shuffled = [_rec(lba) for lba in (9, 3, 7, 1, 5, 2)]
    assert sortseal.sort_plan(shuffled) == list(range(6))
    # A block written twice: the older record is left out.
    assert sortseal.sort_plan([*shuffled, _rec(3)]) == [0, 2, 3, 4, 5, 6]
    assert sortseal.sort_plan([*shuffled, _rec(50, 16), _rec(20, kind=ZERO)]) is not None
    assert sortseal.sort_plan([_rec(lba) for lba in range(10)]) is None      # in order already
    assert sortseal.sort_plan(shuffled[:3]) is None                         # too few
    assert sortseal.sort_plan([*shuffled, _rec(50, 17)]) is None            # a long record
    assert sortseal.sort_plan([*shuffled, _rec(2, 2)]) is None              # overlaps, not 1 on 1
    assert sortseal.sort_plan([*shuffled, _rec(20, flags=0), _rec(21)]) is None  # a transaction of 2
    assert sortseal.sort_plan([*shuffled, Record(RESIZE, FLAG_COMMIT, 8 * MiB, 0, 0, b"")]) is None


def _open(tmp_path, compression: str = "none", sort: bool = True) -> Volume:
    store = open_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", SIZE, segment_size=MiB, seal_interval=3600,
                  compression=compression, sort_at_seal=sort)
    return Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))


def _random_writes(vol, model: bytearray, rng: random.Random, count: int, tag: int) -> None:
    for i in range(count):
        lba = rng.randrange(NBLOCKS // 2)    # half the volume: some blocks written twice
        data = block(tag * 100_000 + i, lba)
        vol.write(lba * BS, data)
        model[lba * BS:(lba + 1) * BS] = data


def _body_in_block_order(path: str) -> bool:
    _trailer, records = read_sealed_index(path, where=path)
    data = sorted((r.data_offset, r.lba) for r in records if r.kind == DATA)
    return [lba for _off, lba in data] == sorted(lba for _off, lba in data)


@pytest.mark.parametrize("compression", ["none", "zstd:1"])
def test_sorted_segments_read_back_a_model(tmp_path, compression):
    vol = _open(tmp_path, compression)
    testing.stop_read_defrag(vol)
    rng = random.Random(3)
    model = bytearray(SIZE)
    try:
        _random_writes(vol, model, rng, 200, 1)
        testing.seal_now(vol)       # a sealer behind the writers sorts only the newest
        vol.write_zeroes(7 * BS, BS)          # a ZERO record among them
        model[7 * BS:8 * BS] = bytes(BS)
        _random_writes(vol, model, rng, 200, 2)
        testing.seal_now(vol)
        _random_writes(vol, model, rng, 600, 3)
        top = testing.seal_now(vol)
        assert vol.stats["segments_sorted"] >= 3
        sorted_files = [s for s in range(1, top + 1)
                        if _body_in_block_order(testing.local_path(vol, s))]
        assert len(sorted_files) >= 2
        for off in range(0, SIZE, MiB):
            assert vol.read(off, MiB) == bytes(model[off:off + MiB])
        assert all(testing.wait_stored(vol, s) for s in range(1, top + 1))
        assert vol.verify() == []
    finally:
        vol.close()
        vol.store.close()
    store = open_store("file://" + str(tmp_path / "store"))
    try:
        assert read_from_store(store, tmp_path / "cache") == bytes(model)   # the cache dir kept
        wipe(tmp_path / "cache")
        assert read_from_store(store, tmp_path / "new") == bytes(model)     # the store alone: chain checked
    finally:
        store.close()


def test_segments_are_not_sorted_unless_the_volume_says_so(tmp_path):
    vol = _open(tmp_path, sort=False)
    try:
        _random_writes(vol, bytearray(SIZE), random.Random(1), 600, 1)
        testing.seal_now(vol)
        assert vol.stats["segments_sealed"] >= 2 and vol.stats["segments_sorted"] == 0
    finally:
        vol.close()
        vol.store.close()


def test_a_segment_in_order_keeps_its_layout(tmp_path):
    vol = _open(tmp_path)
    try:
        for lba in range(600):
            vol.write(lba * BS, block(1, lba))
        testing.seal_now(vol)
        assert vol.stats["segments_sorted"] == 0
    finally:
        vol.close()
        vol.store.close()


def test_a_read_planned_before_the_sort_reads_right(tmp_path, monkeypatch):
    """A read planned against the sealed journal, whose file is then
    replaced by the sorted one before the read opens it, reads again at
    the blocks' new offsets."""
    vol = _open(tmp_path)
    testing.stop_read_defrag(vol)
    rng = random.Random(5)
    model = bytearray(SIZE)
    go, applied = threading.Event(), threading.Event()
    testing.before_sealer_step(monkeypatch, "sort", lambda: go.wait(10))
    testing.before_sealer_step(monkeypatch, "apply", lambda: applied.wait(10))
    try:
        _random_writes(vol, model, rng, 200, 1)
        seg = testing.seal_queued(vol)
        assert seg is not None
        assert vol.read(0, SIZE // 2) == bytes(model[:SIZE // 2])   # the journal's file held open
        runs = testing.plan_read(vol, 0, NBLOCKS // 2)
        assert any(r[2] == seg.seq and r[4] is not None for r in runs)   # from the journal
        go.set()
        deadline = time.monotonic() + 10
        while vol.stats["segments_sorted"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vol.stats["segments_sorted"] == 1
        assert testing.read_planned(vol, runs) == bytes(model[:SIZE // 2])
        assert vol.read(0, SIZE // 2) == bytes(model[:SIZE // 2])   # planned after the sort
        applied.set()
        testing.seal_now(vol)
        assert vol.read(0, SIZE) == bytes(model)
    finally:
        go.set()
        applied.set()
        vol.close()
        vol.store.close()


@pytest.mark.parametrize("when", ["before the rename", "before the map"])
def test_a_crash_around_the_sort_loses_nothing(tmp_path, monkeypatch, when):
    """A crash after the sorted file was written but before it took the
    segment's name (a leftover beside the sealed journal), or after it took
    it but before the map named it (and a later segment sealed naming its
    trailer), with more writes flushed: the volume opens with every write,
    the leftover gone."""
    vol = _open(tmp_path)
    testing.stop_read_defrag(vol)
    rng = random.Random(9)
    model = bytearray(SIZE)
    held, release = threading.Event(), threading.Event()

    def crash_here():
        held.set()
        release.wait(10)
        raise RuntimeError("the process died here")

    if when == "before the rename":
        real_write = sealer_module.write_sorted

        def write_then_crash(*args, **kw):
            real_write(*args, **kw)
            crash_here()

        monkeypatch.setattr(sealer_module, "write_sorted", write_then_crash)
    else:
        testing.before_sealer_step(monkeypatch, "apply", crash_here)
    try:
        _random_writes(vol, model, rng, 200, 1)
        first = testing.seal_queued(vol)
        assert first is not None
        assert held.wait(10)
        path = testing.local_path(vol, first.seq)
        assert os.path.exists(path + sortseal.SORT_SUFFIX) == (when == "before the rename")
        assert _body_in_block_order(path) == (when == "before the map")
        _random_writes(vol, model, rng, 200, 2)
        if when == "before the map":     # (before, the next seal waits for the sort)
            assert testing.seal_queued(vol) is not None      # names the sorted trailer
        _random_writes(vol, model, rng, 50, 3)
        vol.flush()
    finally:
        release.set()
        vol.abandon()
        vol.store.close()
    store = open_test_store("file://" + str(tmp_path / "store"))
    try:
        again = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
        try:
            assert not os.path.exists(path + sortseal.SORT_SUFFIX)
            assert again.read(0, SIZE) == bytes(model)
        finally:
            again.close()
    finally:
        store.close()


def test_the_sorted_bytes_are_those_of_docs_format(tmp_path, monkeypatch):
    """docs/format.md's example, byte by byte: DATA lba 9, 3, 9, 1 sorted."""
    monkeypatch.setattr(sortseal, "SORT_MIN_RECORDS", 1)
    vid = bytes(15) + b"\1"
    header = encode_header(vid, 7, BS, 1_700_000_000 * 10**9)
    parts, records, pos = [header], [], len(header)
    for tag, lba in enumerate((9, 3, 9, 1)):
        data = block(tag, lba)
        crcs = block_crcs(data, BS)
        head = encode_record(DATA, FLAG_COMMIT, lba, 1, crcs)
        parts += [head, data]
        records.append(Record(DATA, FLAG_COMMIT, lba, 1, pos + len(head), crcs))
        pos += len(head) + len(data)
    assert [r.data_offset for r in records] == [92, 4216, 8340, 12464]
    trailer = Trailer(volume_id=vid, seq=7, footer_offset=pos, footer_length=0, record_count=4,
                      sealed_ns=1_700_000_001 * 10**9, volume_size=MiB, footer_crc=0, prev_crc=5)
    src = tmp_path / "journal"
    src.write_bytes(b"".join(parts))
    keep = sortseal.sort_plan(records)
    assert keep == [1, 2, 3]
    fd = os.open(src, os.O_RDONLY)
    try:
        new_trailer, new_records, raw = sortseal.write_sorted(fd, str(tmp_path / "sorted"),
                                                              records, keep, trailer, BS)
    finally:
        os.close(fd)
    out = (tmp_path / "sorted").read_bytes()
    assert out[:64] == header
    assert out[64:92] == encode_record(DATA, FLAG_COMMIT, 1, 1, records[3].crcs)
    assert out[92:4188] == block(3, 1)
    assert out[4188:4216] == encode_record(DATA, FLAG_COMMIT, 3, 1, records[1].crcs)
    assert out[4216:8312] == block(1, 3)
    assert out[8312:8340] == encode_record(DATA, FLAG_COMMIT, 9, 1, records[2].crcs)
    assert out[8340:12436] == block(2, 9)
    footer = out[12436:12436 + 84]
    entries = [footer[k:k + 24].hex() for k in (0, 28, 56)]
    assert entries == ["01010000" "01000000" "0300000000000000" "7810000000000000",
                       "01010000" "01000000" "0900000000000000" "9420000000000000",
                       "01010000" "01000000" "0100000000000000" "5c00000000000000"]
    assert [footer[k + 24:k + 28] for k in (0, 28, 56)] == [records[i].crcs for i in (1, 2, 3)]
    assert len(out) == 12436 + 84 + 80 and out[-80:] == raw
    assert (new_trailer.footer_offset, new_trailer.footer_length, new_trailer.record_count,
            new_trailer.sealed_ns, new_trailer.prev_crc) == (12436, 84, 3, trailer.sealed_ns, 5)
    assert read_sealed_index(str(tmp_path / "sorted"), where="t") == (new_trailer, new_records)


def test_a_write_that_fills_a_segment_during_a_sort_does_not_wait(tmp_path, monkeypatch):
    """A nowait write (a front end's event loop) that fills the open
    segment while the one before is being sorted returns at once; the
    segment is sealed when the sort is done."""
    vol = _open(tmp_path)
    testing.stop_read_defrag(vol)
    rng = random.Random(11)
    model = bytearray(SIZE)
    go, entered = threading.Event(), threading.Event()
    real_write = sealer_module.write_sorted

    def held_write(*args, **kw):
        entered.set()
        go.wait(20)
        return real_write(*args, **kw)

    monkeypatch.setattr(sealer_module, "write_sorted", held_write)
    try:
        _random_writes(vol, model, rng, 200, 1)
        assert testing.seal_queued(vol) is not None
        assert entered.wait(10)                           # its sort waits for go
        sealed = vol.stats["segments_sealed"]
        done = threading.Event()

        def fill():
            for i in range(400):                          # more than a segment
                lba = rng.randrange(NBLOCKS)
                data = block(200_000 + i, lba)
                vol.write(lba * BS, data, nowait=True)
                model[lba * BS:(lba + 1) * BS] = data
            done.set()

        writer = threading.Thread(target=fill)
        writer.start()
        assert done.wait(10), "a nowait write waited for the sort"
        assert vol.stats["segments_sealed"] == sealed      # the full one waits for the sort
        go.set()
        writer.join()
        deadline = time.monotonic() + 10
        while vol.stats["segments_sealed"] == sealed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vol.stats["segments_sealed"] == sealed + 1
        testing.seal_now(vol)
        assert vol.read(0, SIZE) == bytes(model)
    finally:
        go.set()
        vol.close()
        vol.store.close()
