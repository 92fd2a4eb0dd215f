"""Recovery from the store alone (DESIGN invariants 2 and 3): a lost cache dir,
checkpoints (good, corrupt, missing), gaps in the segment sequence, and a
cache dir that belongs to an older volume of the same name."""

from __future__ import annotations

import os
import random
import time

import pytest
from engine_helpers import (
    BS,
    MiB,
    RecordingStore,
    block,
    blocks,
    open_test_store,
    read_all,
    read_from_store,
    segment_seqs,
    wipe,
)

from lsbd import names
from lsbd.segments import checkpoints as ckpt
from lsbd.engine import sealer as sealer_mod
from lsbd.meta.config import create_volume
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.names import cache_dir_for
from lsbd.errors import StoreError
from lsbd.store.faulty import FaultyStore

SIZE = 64 * MiB


@pytest.fixture
def store(store_url):
    s = open_test_store(store_url)
    yield s
    s.close()


def _open(store, cache, **kw) -> Volume:
    return Volume.open(store, "vol", cache_root=str(cache), **kw)


def _write_pattern(vol, rng: random.Random, tag: int, count: int, *, max_blocks: int = 48) -> None:
    for _ in range(count):
        n = rng.randint(1, max_blocks)
        lba = rng.randrange(0, vol.size // BS - n)
        vol.write(lba * BS, blocks(tag, lba, n))
        tag += 1


def test_lost_cache_dir_rebuilds_identical_bytes(store, tmp_path):
    create_volume(store, "vol", SIZE, segment_size=1 * MiB)
    cache = tmp_path / "cache"
    vol = _open(store, cache)
    _write_pattern(vol, random.Random(1), 1, 60)
    vol.write_zeroes(10 * BS, 5 * BS)
    vol.trim(2 * MiB, 1 * MiB)
    vol.write(123457, b"unaligned bytes across a block boundary" * 200)
    expected = read_all(vol)
    vol.close()
    assert len(segment_seqs(store, "vol")) >= 3

    wipe(cache)
    vol = _open(store, cache)  # a writer, from the store alone
    try:
        assert read_all(vol) == expected
        vol.write(0, block(999, 0))  # and it can go on writing
        expected = block(999, 0) + expected[BS:]
    finally:
        vol.close()
    wipe(cache)
    assert read_from_store(store, tmp_path / "reader-after") == expected


def test_recovery_from_checkpoint_plus_later_segments(store, tmp_path):
    """Automatic checkpoints (every 2 segments); after a crash the store holds
    a checkpoint and segments after it: recovery loads the checkpoint and
    replays only the segments after it."""
    create_volume(store, "vol", SIZE, segment_size=256 * 1024, checkpoint_segments=2,
                  flush_mode="store")
    cache = tmp_path / "cache"
    vol = _open(store, cache)
    rng = random.Random(2)
    _write_pattern(vol, rng, 1, 20)
    vol.flush()
    # The background timer checkpoints within a fraction of a second.
    deadline = time.monotonic() + 20
    while not ckpt.list_checkpoints(store, "vol") and time.monotonic() < deadline:
        time.sleep(0.05)
    cps = ckpt.list_checkpoints(store, "vol")
    assert cps, "no automatic checkpoint after many segments with checkpoint_segments=2"
    testing.stop_background(vol)  # no more automatic checkpoints: later segments stay after it
    _write_pattern(vol, rng, 1000, 10)
    vol.flush()           # flush mode 'store': the segments are in the store now
    expected = read_all(vol)
    vol.abandon()         # a crash: no checkpoint at close
    newest = max(ckpt.list_checkpoints(store, "vol"))
    segs = segment_seqs(store, "vol")
    assert max(segs) > newest, "the test needs segments after the newest checkpoint"

    wipe(cache_dir_for(str(cache), store, "vol"))
    rec = RecordingStore(store)
    reader = Volume.open(rec, "vol", cache_root=str(tmp_path / "reader"), read_only=True)
    try:
        # Only the segments after the checkpoint had their index read.
        replayed = {names.parse_seq(k) for k in rec.tail_keys(names.segment_prefix("vol"))}
        assert replayed == {s for s in segs if s > newest}
        assert reader.applied_seq == max(segs)
        assert read_all(reader) == expected
    finally:
        reader.close()

    vol = _open(store, cache, break_lease=True)
    try:
        assert read_all(vol) == expected
    finally:
        vol.close()


def _two_checkpoints(store, tmp_path):
    """A volume with two checkpoints and segments after the newer; returns the
    expected bytes and the checkpoint seqs."""
    create_volume(store, "vol", SIZE, segment_size=256 * 1024, flush_mode="store")
    cache = tmp_path / "cache"
    vol = _open(store, cache)
    rng = random.Random(3)
    _write_pattern(vol, rng, 1, 8)
    first = vol.checkpoint()
    _write_pattern(vol, rng, 100, 8)
    second = vol.checkpoint()
    _write_pattern(vol, rng, 200, 8)
    vol.flush()
    expected = read_all(vol)
    vol.close()
    cps = ckpt.list_checkpoints(store, "vol")
    assert first in cps and second in cps and first < second
    return expected, cps


def _damage(store, key: str) -> None:
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x40
    store.put(key, bytes(data))


@pytest.mark.parametrize("what", ["manifest", "part"])
def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(store, tmp_path, what):
    expected, cps = _two_checkpoints(store, tmp_path)
    newest = cps[-1]
    if what == "manifest":
        _damage(store, names.checkpoint_manifest_key("vol", newest))
    else:
        _damage(store, names.checkpoint_part_key("vol", newest, 0))
    rec = RecordingStore(store)
    reader = Volume.open(rec, "vol", cache_root=str(tmp_path / "reader"), read_only=True)
    try:
        # Opening used the next older checkpoint, not a full replay from seq 1
        # (index reads while opening; later data reads fetch indexes too).
        replayed = {names.parse_seq(k) for k in rec.tail_keys(names.segment_prefix("vol"))}
        assert replayed and min(replayed) == cps[-2] + 1
        assert read_all(reader) == expected
    finally:
        reader.close()
    # A writer from the store alone too.
    vol = _open(store, tmp_path / "cache2")
    try:
        assert read_all(vol) == expected
    finally:
        vol.close()


def test_every_checkpoint_corrupt_means_a_full_replay(store, tmp_path):
    expected, cps = _two_checkpoints(store, tmp_path)
    for seq in cps:
        _damage(store, names.checkpoint_manifest_key("vol", seq))
    rec = RecordingStore(store)
    reader = Volume.open(rec, "vol", cache_root=str(tmp_path / "reader"), read_only=True)
    try:
        assert read_all(reader) == expected
        replayed = {names.parse_seq(k) for k in rec.tail_keys(names.segment_prefix("vol"))}
        assert replayed == set(segment_seqs(store, "vol"))
    finally:
        reader.close()


def _one_write_per_segment(store, tmp_path, count: int):
    """count segments, segment i holding exactly write i (flush mode 'store'
    seals on every flush); no checkpoint (the writer 'crashes' at the end).
    Returns the state after each prefix: states[k] = bytes after segments 1..k."""
    create_volume(store, "vol", 16 * MiB, flush_mode="store")
    cache = tmp_path / "cache"
    vol = _open(store, cache)
    states = [read_all(vol)]
    rng = random.Random(4)
    for i in range(1, count + 1):
        n = rng.randint(1, 16)
        lba = rng.randrange(0, 64)  # overlapping, so the order matters
        vol.write(lba * BS, blocks(i, lba, n))
        vol.flush()
        assert vol.applied_seq == i
        states.append(read_all(vol))
    vol.abandon()
    wipe(cache_dir_for(str(cache), store, "vol"))
    assert segment_seqs(store, "vol") == list(range(1, count + 1))
    assert ckpt.list_checkpoints(store, "vol") == []
    return states


def test_recovery_stops_at_a_gap(store, tmp_path):
    states = _one_write_per_segment(store, tmp_path, 6)
    store.delete(names.segment_key("vol", 3))

    # A reader opens the prefix before the gap, and touches nothing.
    reader = Volume.open(store, "vol", cache_root=str(tmp_path / "reader"), read_only=True)
    try:
        assert reader.applied_seq == 2
        assert read_all(reader) == states[2]
    finally:
        reader.close()
    assert segment_seqs(store, "vol") == [1, 2, 4, 5, 6]

    # A writer opens the same prefix and removes the orphans after the gap:
    # they were never part of the volume and their seqs will be written again.
    vol = _open(store, tmp_path / "cache", break_lease=True)
    try:
        assert vol.applied_seq == 2
        assert read_all(vol) == states[2]
        assert segment_seqs(store, "vol") == [1, 2]
        vol.write(0, block(77, 0))
        vol.flush()
        expected = block(77, 0) + states[2][BS:]
    finally:
        vol.close()
    assert read_from_store(store, tmp_path / "reader-after") == expected


def test_cache_dir_of_a_deleted_volume_with_the_same_name_is_not_trusted(store, tmp_path):
    cache = tmp_path / "cache"
    create_volume(store, "vol", SIZE)
    vol = _open(store, cache)
    vol.write(0, blocks(1, 0, 32))                 # old data at blocks 0..31
    vol.write(8 * MiB, blocks(2, 2048, 32))
    vol.close()
    folder = cache_dir_for(str(cache), store, "vol")

    # Delete the volume in the store only (the cache dir stays), recreate it.
    for info in list(store.list(names.volume_prefix("vol"))):
        store.delete(info.key)
    create_volume(store, "vol", SIZE)
    assert os.path.isdir(folder), "the test needs the old cache dir to still be there"

    vol = _open(store, cache)
    try:
        assert vol.applied_seq == 0
        assert vol.read(0, 32 * BS) == bytes(32 * BS), "stale data from the deleted volume"
        assert vol.read(8 * MiB, 32 * BS) == bytes(32 * BS)
        assert vol.allocation(0, 32 * MiB) == [(0, 32 * MiB, False)]
        vol.write(4 * BS, block(3, 4))
    finally:
        vol.close()
    vol = _open(store, cache)
    try:
        assert vol.read(0, 8 * BS) == bytes(4 * BS) + block(3, 4) + bytes(3 * BS)
        assert vol.read(8 * MiB, 32 * BS) == bytes(32 * BS)
    finally:
        vol.close()


def test_cache_dir_of_a_recreated_volume_with_more_segments_is_not_trusted(store, tmp_path):
    """The recreated volume already has as many segments as the old one had:
    the cache's segment fingerprints must tell them apart."""
    cache = tmp_path / "cache"
    create_volume(store, "vol", SIZE)
    vol = _open(store, cache)
    vol.write(0, blocks(1, 0, 8))
    vol.close()
    for info in list(store.list(names.volume_prefix("vol"))):
        store.delete(info.key)
    create_volume(store, "vol", SIZE)
    other = _open(store, tmp_path / "other-machine")
    other.write(64 * BS, blocks(2, 64, 8))
    other.close()

    vol = _open(store, cache)
    try:
        assert vol.read(0, 8 * BS) == bytes(8 * BS), "stale data from the deleted volume"
        assert vol.read(64 * BS, 8 * BS) == blocks(2, 64, 8)
    finally:
        vol.close()


def test_cache_dir_behind_the_store_is_not_trusted(store, tmp_path):
    """Another machine wrote to the volume after this cache dir was last used
    (lease moved away and back): the cache must catch up, not serve old blocks."""
    cache = tmp_path / "cache"
    create_volume(store, "vol", SIZE)
    vol = _open(store, cache)
    vol.write(0, blocks(1, 0, 8))
    vol.close()
    other = _open(store, tmp_path / "other-machine")
    other.write(0, blocks(2, 0, 8))
    other.close()
    vol = _open(store, cache)
    try:
        assert vol.read(0, 8 * BS) == blocks(2, 0, 8)
    finally:
        vol.close()


def test_reopen_after_out_of_order_uploads_tracks_durability(tmp_path, monkeypatch):
    store = FaultyStore(open_test_store("file://" + str(tmp_path / "store")))
    create_volume(store, "vol", SIZE)
    cache = str(tmp_path / "cache")
    vol = Volume.open(store, "vol", cache_root=cache)
    for seq in (1, 3):  # these uploads do not get through before the crash; segment 2's does
        store.fail(op="put", key_prefix=names.segment_key("vol", seq), times=None,
                   error=StoreError)
    for i in range(3):
        vol.write(i * BS, block(i + 1, i))
        testing.seal_now(vol)
    assert testing.wait_stored(vol, 2)
    vol.abandon()  # the crash
    store.heal()

    monkeypatch.setattr(sealer_mod, "STORE_FLUSH_TIMEOUT", 3.0)
    vol = Volume.open(store, "vol", cache_root=cache, break_lease=True, flush_mode="store")
    try:
        vol.flush()  # every earlier write is in the store: returns at once
        assert segment_seqs(store, "vol") == [1, 2, 3]
    finally:
        vol.close()
    assert not store.exists(names.lease_key("vol")), "a clean close kept the lease"
