"""Read-directed defragmentation (lsbd/engine/readdefrag.py): a read that
finds its blocks scattered gets them laid out in order in the background,
without ever undoing a newer write."""

from __future__ import annotations

import random
import threading
import time

import pytest
from engine_helpers import BS, MiB, block, blocks, open_test_store, read_all

from lsbd.engine import testing
from lsbd.engine import readdefrag
from lsbd.engine.volume import Volume
from lsbd.engine.writer import Writer
from lsbd.map.blockmap import Extent
from lsbd.meta.config import create_volume


def test_which_reads_are_scattered():
    sealed = [(i, 1, 7, i * BS, None) for i in range(64)]          # 64 pieces of 4 KiB
    assert readdefrag.scattered(sealed, BS)
    assert not readdefrag.scattered(sealed[:16], BS)               # 64 KiB: too short
    assert not readdefrag.scattered([(0, 64, 7, 0, None)], BS)     # one piece
    journal = [(i, 1, 7, i * BS, [0]) for i in range(64)]          # the open journal's
    assert not readdefrag.scattered(journal, BS)
    holes = [(i, 1, None, 0, None) for i in range(64)]
    assert not readdefrag.scattered(holes, BS)


def test_offers_past_a_full_queue_are_counted_as_dropped(monkeypatch):
    monkeypatch.setattr(readdefrag, "QUEUE_BYTES", 3 * MiB)
    release = threading.Event()
    rd = readdefrag.ReadDefrag(lambda runs, data, at: release.wait(10) and len(data),
                               name="test")
    try:
        offered = [rd.offer([], bytes(1 * MiB), 0) for _ in range(6)]
        # The worker holds one, the queue three: the last two find it full.
        assert offered.count(False) >= 2 and rd.dropped == offered.count(False) * MiB
        release.set()
        assert rd.drain()
        assert rd.moved + rd.dropped == 6 * MiB
    finally:
        release.set()
        rd.close()



class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_pacer_lets_a_burst_through_and_holds_the_average():
    clock = _Clock()
    pacer = readdefrag.Pacer(rate=100, burst=50, clock=clock)
    assert [pacer.spend(10) for _ in range(5)] == [0] * 5     # a full bucket: at once
    assert pacer.spend(10) == pytest.approx(0.1)              # then at the rate
    spent, start = 60, clock.now
    for _ in range(100):
        clock.now += pacer.spend(10)
        spent += 10
    assert spent <= 50 + 100 * (clock.now - start) + 10
    clock.now += 3600                                         # a long quiet spell
    waits = [pacer.spend(10) for _ in range(8)]
    assert waits[:5] == [0] * 5 and min(waits[5:]) > 0        # fills the bucket, no more


def _offer_paced(rd, count: int, every: float) -> list[bool]:
    offered = []
    for _ in range(count):
        offered.append(rd.offer([], bytes(1 * MiB), 0))
        time.sleep(every)
    return offered


def test_a_relocation_keeps_up_with_a_burst_of_reads(monkeypatch):
    """Reads faster than RATE for a moment: the queue's worth goes at once
    instead of at RATE while the queue overflows."""
    monkeypatch.setattr(readdefrag, "QUEUE_BYTES", 4 * MiB)
    monkeypatch.setattr(readdefrag, "RATE", 8 * MiB)
    rd = readdefrag.ReadDefrag(lambda runs, data, at: len(data), name="test")
    try:
        assert all(_offer_paced(rd, 8, 0.02))        # 8 MiB in 0.16 s, 50 MiB/s
        assert rd.drain() and rd.dropped == 0 and rd.moved == 8 * MiB
    finally:
        rd.close()


def test_the_relocation_keeps_to_its_rate_on_average(monkeypatch):
    monkeypatch.setattr(readdefrag, "QUEUE_BYTES", 2 * MiB)
    monkeypatch.setattr(readdefrag, "RATE", 32 * MiB)
    started: list[float] = []

    def relocate(runs, data, at):
        started.append(time.monotonic())
        return len(data)

    rd = readdefrag.ReadDefrag(relocate, name="test")
    try:
        time.sleep(0.3)                               # quiet: the bucket fills, no more
        _offer_paced(rd, 100, 0.005)                  # up to 200 MiB/s for 0.5 s
        rd.close()
    finally:
        rd.close()
    assert len(started) > 4
    # Any stretch of relocations: the bucket's depth, RATE's worth of the
    # time between their starts, the last one.
    for i in range(len(started)):
        for j in range(i, len(started)):
            assert (j - i + 1) * MiB <= 3 * MiB + 32 * MiB * (started[j] - started[i]) + 1024


@pytest.fixture
def vol(tmp_path):
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", 16 * MiB, segment_size=256 * 1024, seal_interval=3600)
    v = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    yield v
    v.close()
    store.close()


def _scatter(vol, n: int = 256) -> bytes:
    order = list(range(n))
    random.Random(4).shuffle(order)
    for tag, lba in enumerate(order):
        vol.write(lba * BS, block(tag, lba))
    testing.seal_now(vol)
    # In reads too short to count as scattered.
    return b"".join(vol.read(off, 16 * BS) for off in range(0, n * BS, 16 * BS))


def test_a_scattered_read_is_laid_out_in_order(vol):
    expected = _scatter(vol)
    assert len(vol.map_extents(0, 256)) == 256
    assert vol.read(0, 1 * MiB) == expected          # scattered: queued
    assert testing.read_defrag(vol).drain()
    testing.seal_now(vol)
    assert len(vol.map_extents(0, 256)) == 1         # one run, one extent
    assert vol.read(0, 1 * MiB) == expected
    assert vol.usage()["read_defrag_bytes"] == 1 * MiB
    assert vol.usage()["read_defrag_dropped_bytes"] == 0
    vol.close()
    reopened = Volume.open(vol.store, "vol", cache_root=vol.cache_root)
    try:
        assert reopened.read(0, 1 * MiB) == expected
    finally:
        reopened.close()


def test_a_newer_write_wins_over_a_late_relocation(vol):
    testing.stop_read_defrag(vol)   # relocations by hand only
    _scatter(vol)
    runs = vol.map_extents(0, 256)
    loaded = [(Extent(e.lba, e.nblocks, e.seq, e.offset), vol.read(e.lba * BS, e.nblocks * BS))
              for e in runs]
    vol.write(5 * BS, blocks(999, 5, 3))             # after the read, before the relocation
    testing.seal_now(vol)
    expected = vol.read(0, 1 * MiB)
    moved = vol.relocate_loaded(loaded)
    assert moved == (256 - 3) * BS
    testing.seal_now(vol)
    assert vol.read(0, 1 * MiB) == expected
    assert vol.read(5 * BS, 3 * BS) == blocks(999, 5, 3)


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "in-journal"])
def test_a_write_after_the_read_planned_wins_over_its_relocation(vol, sealed):
    """A read's bytes are moved only after planning the range again when
    something was written since it planned: they may be stale."""
    testing.stop_read_defrag(vol)
    _scatter(vol)
    runs, planned_at = testing.plan_read(vol, 0, 256)
    data = vol.read(0, 1 * MiB)
    vol.write(5 * BS, blocks(999, 5, 3))
    if sealed:
        testing.seal_now(vol)
    assert testing.content_changes(vol) != planned_at
    expected = vol.read(0, 1 * MiB)
    assert vol.relocate_read(runs, data, planned_at) == (256 - 3) * BS
    testing.seal_now(vol)
    assert vol.read(0, 1 * MiB) == expected
    assert vol.read(5 * BS, 3 * BS) == blocks(999, 5, 3)


def test_an_unchanged_range_is_moved_without_a_second_plan(vol, monkeypatch):
    testing.stop_read_defrag(vol)
    expected = _scatter(vol)
    vol.write(300 * BS, blocks(7, 300, 2))               # a hole and a journal's blocks
    vol.trim(200 * BS, 4 * BS)
    runs, planned_at = testing.plan_read(vol, 0, 302)
    data = vol.read(0, 302 * BS)
    testing.seal_now(vol)                                # sealing changes no block
    some = [(Extent(e.lba, e.nblocks, e.seq, e.offset), vol.read(e.lba * BS, BS))
            for e in vol.map_extents(0, 8)]
    assert vol.relocate_loaded(some) == 8 * BS           # nor does another relocation
    assert testing.content_changes(vol) == planned_at

    def planned(*_a, **_k):
        raise AssertionError("planned again")

    monkeypatch.setattr(Writer, "_planned_records", planned)
    # Only the sealed pieces move: not the hole, nor the journal's blocks.
    assert vol.relocate_read(runs, data, planned_at) == (256 - 4) * BS
    testing.seal_now(vol)
    assert [(e.lba, e.nblocks) for e in vol.map_extents(0, 302)] == \
        [(0, 200), (204, 52), (300, 2)]
    assert vol.read(0, 1 * MiB) == expected[:200 * BS] + bytes(4 * BS) + expected[204 * BS:]
    assert vol.read(300 * BS, 2 * BS) == blocks(7, 300, 2)


def test_every_change_of_a_block_is_counted(vol):
    vol.write(0, blocks(1, 0, 4))
    testing.seal_now(vol)
    changes = [lambda: vol.write(0, block(2, 0)),
               lambda: vol.write(0, blocks(3, 0, 2)),
               lambda: vol.write_many([(8 * BS, block(4, 8))]),
               lambda: vol.write_zeroes(0, BS),
               lambda: vol.trim(BS, BS)]
    for change in changes:
        before = testing.content_changes(vol)
        change()
        assert testing.content_changes(vol) > before
    with vol.transaction() as t:
        before = testing.content_changes(vol)
        t.write(2 * BS, block(5, 2))
    assert testing.content_changes(vol) > before


def test_read_only_volumes_do_not_defragment(vol, tmp_path):
    expected = _scatter(vol)
    vol.flush_to_store()
    with Volume.open(vol.store, "vol", cache_root=str(tmp_path / "ro"), read_only=True) as ro:
        assert testing.read_defrag(ro) is None
        assert read_all(ro)[:1 * MiB] == expected


def test_a_volume_can_turn_it_off(tmp_path):
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "off", 16 * MiB, segment_size=256 * 1024, seal_interval=3600,
                  read_defrag=False)
    with Volume.open(store, "off", cache_root=str(tmp_path / "cache")) as v:
        assert testing.read_defrag(v) is None
        expected = _scatter(v)
        assert v.read(0, 1 * MiB) == expected
        testing.seal_now(v)
        assert len(v.map_extents(0, 256)) == 256
        assert v.usage()["read_defrag_bytes"] == 0
    store.close()


def test_a_session_that_only_reads_changes_nothing(vol):
    """A file system mounted read-only on a writable mount, or a copy out of
    the volume after a disaster, reads scattered ranges: nothing is
    written, so nothing is uploaded, until the session writes."""
    expected = _scatter(vol)
    store, cache_root = vol.store, vol.cache_root
    vol.close()
    reader = Volume.open(store, "vol", cache_root=cache_root)
    try:
        top = reader.applied_seq
        assert reader.read(0, 1 * MiB) == expected          # scattered: not queued
        assert testing.read_defrag(reader).drain()
        testing.seal_now(reader)
        assert reader.usage()["read_defrag_bytes"] == 0 and reader.applied_seq == top
        reader.write(300 * BS, block(1, 300))               # now it writes: reads lay out
        assert reader.read(0, 1 * MiB) == expected
        assert testing.read_defrag(reader).drain()
        assert reader.usage()["read_defrag_bytes"] == 1 * MiB
    finally:
        reader.close()
