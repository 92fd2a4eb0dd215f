"""Relocated segments held back while reads stream (lsbd/engine/sealer.py,
Sealer.holding): read-directed defragmentation's segments wait, unsynced,
unmapped and not uploaded, while scattered reads keep coming, and go on as
soon as anything waits for the sealer or holds a write."""

from __future__ import annotations

import random
import threading
import time

import pytest
from engine_helpers import BS, MiB, block, open_test_store

from lsbd.engine import readdefrag, sealer, testing
from lsbd.engine.volume import Volume
from lsbd.meta.config import create_volume

SEGMENT = 256 * 1024


@pytest.fixture
def store(tmp_path):
    s = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(s, "vol", 16 * MiB, segment_size=SEGMENT, seal_interval=3600)
    yield s
    s.close()


@pytest.fixture
def vol(store, tmp_path):
    v = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    yield v
    v.close()


def _scatter(vol, n: int = 256) -> bytes:
    """n blocks written in a random order, sealed and mapped: what a 1 MiB
    read finds scattered.  Their bytes, in block order."""
    order = list(range(n))
    random.Random(4).shuffle(order)
    for tag, lba in enumerate(order):
        vol.write(lba * BS, block(tag, lba))
    testing.seal_now(vol)
    return b"".join(block(order.index(lba), lba) for lba in range(n))


def _relocate(vol, expected: bytes) -> None:
    """A scattered 1 MiB read, relocated, and the relocation sealed without
    waiting for the sealer (a segment fills at once: it is 256 KiB)."""
    assert vol.read(0, 1 * MiB) == expected
    assert testing.read_defrag(vol).drain()
    testing.seal_queued(vol)
    assert testing.sealing(vol)


def _wait(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_relocated_segments_wait_while_reads_stream(vol):
    expected = _scatter(vol)
    streaming = [True]
    testing.reads_streaming(vol, lambda: streaming[0])
    top = vol.applied_seq
    _relocate(vol, expected)
    time.sleep(0.3)
    held = testing.sealing(vol)
    assert len(held) >= 1 and vol.applied_seq == top      # not mapped
    assert all(seg.dirty for seg in held)                 # nor synced
    assert vol.read(0, 1 * MiB) == expected               # read through its index
    vol.flush()                                           # a flush syncs it as any journal
    assert not any(seg.dirty for seg in testing.sealing(vol))
    assert testing.sealing(vol) and vol.applied_seq == top
    streaming[0] = False                                  # the reads stopped
    assert _wait(lambda: not testing.sealing(vol))
    assert vol.applied_seq > top
    assert len(vol.map_extents(0, 256)) == 1              # laid out in order
    assert vol.read(0, 1 * MiB) == expected


def test_anything_waiting_for_the_sealer_ends_the_hold(vol):
    expected = _scatter(vol)
    testing.reads_streaming(vol, lambda: True)
    _relocate(vol, expected)
    time.sleep(0.2)
    assert testing.sealing(vol)
    done: list[int] = []
    waiter = threading.Thread(target=lambda: done.append(testing.seal_now(vol)), daemon=True)
    waiter.start()
    waiter.join(5)
    assert done and vol.applied_seq >= done[0]
    assert not testing.sealing(vol)
    assert len(vol.map_extents(0, 256)) == 1


def test_a_segment_holding_a_write_is_not_held(vol):
    expected = _scatter(vol)
    testing.reads_streaming(vol, lambda: True)
    assert vol.read(0, 1 * MiB) == expected
    assert testing.read_defrag(vol).drain()
    vol.write(300 * BS, block(9, 300))                    # a write in the same journal
    assert testing.seal_queued(vol) is not None
    assert _wait(lambda: not testing.sealing(vol))
    assert vol.read(300 * BS, BS) == block(9, 300)
    assert vol.read(0, 1 * MiB) == expected


def test_held_relocations_meet_no_back_pressure(vol):
    """Relocations fill more segments than the sealer may have waiting
    before writers wait: held, they go on being written."""
    expected = b"".join(_scatter_at(vol, first) for first in range(0, 2048, 256))
    testing.reads_streaming(vol, lambda: True)
    got = b"".join(vol.read(off, 1 * MiB) for off in range(0, 8 * MiB, 1 * MiB))
    assert got == expected
    assert testing.read_defrag(vol).drain(timeout=10)
    assert len(testing.sealing(vol)) > sealer.MAX_SEALING
    testing.seal_now(vol)
    assert len(vol.map_extents(0, 2048)) == 8            # a run for each read
    assert b"".join(vol.read(off, 1 * MiB) for off in range(0, 8 * MiB, 1 * MiB)) == expected


def _scatter_at(vol, first: int, n: int = 256) -> bytes:
    order = list(range(first, first + n))
    random.Random(first).shuffle(order)
    for lba in order:
        vol.write(lba * BS, block(lba, lba))
    testing.seal_now(vol)
    return b"".join(block(lba, lba) for lba in range(first, first + n))


def test_the_hold_is_bounded(vol, monkeypatch):
    monkeypatch.setattr(sealer, "HOLD_BYTES", SEGMENT // 2)
    expected = _scatter(vol)
    testing.reads_streaming(vol, lambda: True)
    _relocate(vol, expected)
    assert _wait(lambda: not testing.sealing(vol))


def test_a_crash_while_relocations_are_held_loses_no_write(vol, store, tmp_path):
    expected = _scatter(vol)
    vol.flush()
    testing.reads_streaming(vol, lambda: True)
    _relocate(vol, expected)
    time.sleep(0.2)
    assert testing.sealing(vol)
    vol.abandon()                                         # held: never synced nor mapped
    reopened = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), break_lease=True)
    try:
        assert reopened.read(0, 1 * MiB) == expected
    finally:
        reopened.close()


def test_reads_stream_while_scattered_reads_keep_coming(monkeypatch):
    monkeypatch.setattr(readdefrag, "STREAM_GAP", 0.2)
    rd = readdefrag.ReadDefrag(lambda runs, data, at: len(data), name="test")
    try:
        assert not rd.streaming()
        rd.offer([], bytes(BS), 0)
        assert rd.streaming()
        time.sleep(0.3)
        assert not rd.streaming()
    finally:
        rd.close()
