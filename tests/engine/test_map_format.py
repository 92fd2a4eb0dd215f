"""The block map's encoding on the cache disk (docs/format.md "Cache dir"):
golden bytes, values too wide for the short form, and a cache dir written
by map format 1 that must keep working, journals not yet uploaded included."""

from __future__ import annotations

import os
import random
import struct

import lmdb
import pytest
from engine_helpers import BS, MiB, blocks, open_test_store, read_all, read_from_store

from lsbd.map import blockmap, encoding, mapfile
from lsbd.map import testing as map_testing
from lsbd.map.blockmap import BlockMap, Extent, SegmentInfo
from lsbd.meta.config import create_volume
from lsbd.format.segment import DATA, TRIM, Record
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.names import cache_dir_for


def test_golden_extent_bytes():
    assert encoding.key_of(0x0102030405) == bytes.fromhex("000102030405")
    # 3 blocks of segment 7 at byte 0x1234: nblocks u16, seq u32, offset u32.
    assert encoding.value_of(3, 7, 0x1234) == bytes.fromhex("0300" "07000000" "34120000")
    # Too wide for the short form: the 20-byte form of map format 1.
    assert encoding.value_of(1, 1 << 32, 5) == struct.pack("<IQQ", 1, 1 << 32, 5)
    assert encoding.unpack_value(encoding.value_of(1 << 16, 9, 1 << 33)) == (1 << 16, 9, 1 << 33)


def _info(seq: int) -> SegmentInfo:
    return SegmentInfo(seq=seq, state=blockmap.STORED, sealed_ns=0, size=1, live_blocks=0,
                       data_blocks=0, trailer_crc=0)


def test_wide_values_and_short_ones_mix_in_one_map(tmp_path):
    bm = BlockMap(str(tmp_path / "map"), BS)
    try:
        big = 1 << 33
        bm.load([Extent(10, 70000, 3, big), Extent(70010, 2, (1 << 32) + 1, 24)],
                [_info(3), _info((1 << 32) + 1)])
        assert bm.lookup(10, 1) == [Extent(10, 1, 3, big)]
        assert bm.lookup_block(10 + 69999) == (3, big + 69999 * BS)
        bm.apply_segment(_info(4), [Record(DATA, 0, 20, 1, 100, b"\0" * 4),
                                    Record(TRIM, 0, 70010, 1, 0, b"")])
        assert list(bm.iter_extents()) == [
            Extent(10, 10, 3, big), Extent(20, 1, 4, 100), Extent(21, 69989, 3, big + 11 * BS),
            Extent(70011, 1, (1 << 32) + 1, 24 + BS)]
        stats = bm.map_stats()
        assert stats["extents"] == 4 and stats["leaf_pages"] >= 1
    finally:
        bm.close()


@pytest.mark.parametrize("wide_every", [0, 7])
def test_lookup_is_the_extents_over_the_range_clipped(tmp_path, wide_every):
    """lookup() against the extents it was loaded with, over ranges that
    start and end inside extents, on their edges and in holes; with every
    value short (decoded in one go) and with wide ones among them."""
    rng = random.Random(wide_every)
    extents, lba = [], 5
    while lba < 4000:
        n = 1 if rng.random() < 0.7 else rng.randint(2, 9)
        seq = rng.randint(1, 50)
        if wide_every and len(extents) % wide_every == 0:
            seq += 1 << 32          # too wide for the short form
        extents.append(Extent(lba, n, seq, rng.randint(0, 999) * BS))
        lba += n + (rng.randint(1, 3) if rng.random() < 0.1 else 0)
    starts = [e.lba for e in extents]

    def expected(first: int, n: int) -> list[Extent]:
        out, end = [], first + n
        for e in extents:
            lo, hi = max(e.lba, first), min(e.lba + e.nblocks, end)
            if lo < hi:
                out.append(Extent(lo, hi - lo, e.seq, e.offset + (lo - e.lba) * BS))
        return out

    bm = BlockMap(str(tmp_path / "map"), BS)
    try:
        bm.load(extents, [_info(s) for s in sorted({e.seq for e in extents})])
        ranges = [(0, 5000), (0, 5), (starts[3], starts[9] - starts[3]),
                  (starts[-1], 1), (starts[-1] + 1, 100)]
        ranges += [(rng.randint(0, 4100), rng.choice([1, 2, 3, 17, 256, 1000]))
                   for _ in range(400)]
        for first, n in ranges:
            assert bm.lookup(first, n) == expected(first, n), (first, n)
    finally:
        bm.close()


def _to_format_1(map_dir: str) -> int:
    """Rewrite a map as map format 1 wrote it: an `extents` database of
    >Q keys and <IQQ values, no `blocks` database, no format mark."""
    env = lmdb.open(map_dir, map_size=1 << 30, max_dbs=4)
    try:
        new = env.open_db(b"blocks")
        old = env.open_db(b"extents")
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            count = 0
            for k, v in list(txn.cursor(db=new)):
                lba = int.from_bytes(k, "big")
                txn.put(struct.pack(">Q", lba), struct.pack("<IQQ", *encoding.unpack_value(v)), db=old)
                count += 1
            txn.drop(new, delete=True)
            txn.delete(b"map_format", db=meta)
        return count
    finally:
        env.close()


@pytest.fixture
def store(tmp_path):
    s = open_test_store("file://" + str(tmp_path / "store"))
    yield s
    s.close()


def test_a_cache_dir_of_map_format_1_keeps_working(store, tmp_path, monkeypatch):
    """Segments in the store, a sealed segment never uploaded and an open
    journal, all under a map of format 1: the map is converted on open and
    every byte reads back, also from the store alone afterwards."""
    monkeypatch.setattr(mapfile, "_MIGRATE_BATCH", 7)   # several batches
    create_volume(store, "vol", 64 * MiB, segment_size=256 * 1024, flush_mode="journal")
    cache = str(tmp_path / "cache")
    vol = Volume.open(store, "vol", cache_root=cache)
    rng = random.Random(5)
    for tag in range(1, 80):
        n = rng.randint(1, 40)
        lba = rng.randrange(0, vol.size // BS - n)
        vol.write(lba * BS, blocks(tag, lba, n))
    vol.flush()
    testing.seal_now(vol)
    # What follows stays local: the store refuses it (a sealed segment
    # pending upload), then more writes sit in the open journal.
    real_put = store.put
    monkeypatch.setattr(store, "put", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    vol.write(0, blocks(500, 0, 70))
    testing.seal_queued(vol)
    vol.write(3 * MiB, blocks(501, 768, 3))
    vol.flush()
    expected = read_all(vol)
    vol.abandon()
    monkeypatch.setattr(store, "put", real_put)
    map_dir = os.path.join(cache_dir_for(cache, store, "vol"), "map")
    assert _to_format_1(map_dir) > 20

    vol = Volume.open(store, "vol", cache_root=cache, break_lease=True)
    try:
        assert testing.map_meta(vol, "map_format") == b"2"
        assert read_all(vol) == expected
    finally:
        vol.close()
    env = lmdb.open(map_dir, max_dbs=4)
    try:
        with env.begin() as txn:
            assert txn.get(b"extents") is None and txn.get(b"blocks") is not None
    finally:
        env.close()
    assert read_from_store(store, tmp_path / "ro") == expected


def test_parsed_segment_indexes_are_bounded_by_bytes(store, tmp_path, monkeypatch):
    """Reads that touch many segments of random writes keep only
    INDEX_CACHE_BYTES of their indexes in memory (issue #15: the process's
    memory must not grow with the volume)."""
    from lsbd.segments import copies as segfiles

    create_volume(store, "vol", 64 * MiB, segment_size=128 * 1024, seal_interval=3600)
    cache = str(tmp_path / "cache")
    with Volume.open(store, "vol", cache_root=cache) as vol:
        rng = random.Random(9)
        written = {}
        for i in range(600):                 # about 19 segments of one-block records
            lba = rng.randrange(0, vol.size // BS)
            vol.write(lba * BS, blocks(i, lba, 1))
            written[lba] = i
        testing.seal_now(vol)
        files = testing.local_files(vol)
        one = max(idx.nbytes for idx in files._indexes.values()) if files._indexes else 1024
        monkeypatch.setattr(segfiles, "INDEX_CACHE_BYTES", 3 * one)
        for lba, tag in sorted(written.items()):
            assert vol.read(lba * BS, BS) == blocks(tag, lba, 1)
        assert files._index_bytes <= 3 * one
        assert files._index_bytes == sum(i.nbytes for i in files._indexes.values())
        # Something was let go: not every segment's index is still there.
        assert 1 <= len(files._indexes) < len({seq for seq in range(1, vol.applied_seq + 1)})


def test_readers_that_want_one_index_together_load_it_once(store, tmp_path, monkeypatch):
    """Concurrent reads that reach a segment whose index is not cached wait
    for one load of it rather than each decoding the same footer (#15: a
    sequential reader's many requests reach the same segments together)."""
    import threading
    import time
    from lsbd.segments import copies as segfiles

    create_volume(store, "vol", 64 * MiB, segment_size=128 * 1024, seal_interval=3600)
    cache = str(tmp_path / "cache")
    with Volume.open(store, "vol", cache_root=cache) as vol:
        rng = random.Random(5)
        written = {}
        for i in range(120):                 # a few segments of one-block records
            lba = rng.randrange(0, 512)
            vol.write(lba * BS, blocks(i, lba, 1))
            written[lba] = i
        testing.seal_now(vol)
        files = testing.local_files(vol)
        files.forget_indexes()
        loads: list[str] = []
        real = segfiles.read_sealed_footer_from

        def slow_load(pread, size, *, where):
            loads.append(where)
            time.sleep(0.05)                 # the others arrive meanwhile
            return real(pread, size, where=where)

        monkeypatch.setattr(segfiles, "read_sealed_footer_from", slow_load)
        expect = b"".join(blocks(written[b], b, 1) if b in written else bytes(BS)
                          for b in range(512))
        got: list[bytes] = []
        threads = [threading.Thread(target=lambda: got.append(vol.read(0, 512 * BS)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [expect] * 6
        assert loads and len(loads) == len(set(loads)), sorted(loads)


def test_making_room_on_the_disk_lets_the_indexes_of_evicted_segments_go(store, tmp_path,
                                                                         monkeypatch):
    """Eviction for a full disk (make_room) and for the cache limit account
    for the parsed indexes alike: what they held is no longer counted."""
    from lsbd.segments import copies as segfiles

    create_volume(store, "vol", 64 * MiB, segment_size=128 * 1024, seal_interval=3600)
    with Volume.open(store, "vol", cache_root=str(tmp_path / "cache")) as vol:
        for i in range(200):
            vol.write(i * 7 * BS, blocks(i, i * 7, 1))
        testing.seal_now(vol)
        files = testing.local_files(vol)
        seqs = range(1, vol.applied_seq + 1)
        assert all(testing.wait_stored(vol, seq) for seq in seqs)
        for seq in seqs:
            # The file store links what it holds into the cache dir; a copy of
            # its own makes a local segment evictable, as with a remote store.
            path = testing.local_path(vol, seq)
            with open(path, "rb") as f:
                data = f.read()
            os.unlink(path)
            with open(path, "wb") as f:
                f.write(data)
            files.adopt(seq)
        for i in range(200):
            assert vol.read(i * 7 * BS, BS) == blocks(i, i * 7, 1)
        assert files._indexes and files._index_bytes > 0
        monkeypatch.setattr(segfiles, "disk_free", lambda folder: 0)
        assert files.make_room(1) is False              # everything evictable went
        assert files._index_bytes == sum(i.nbytes for i in files._indexes.values())


def _mixed_records(rng: random.Random, count: int, space: int) -> list[Record]:
    out = []
    for _ in range(count):
        n = rng.choice([1, 1, 2, 3, 8])
        lba = rng.randrange(space - n)
        kind = DATA if rng.random() < 0.85 else TRIM
        out.append(Record(kind, 0, lba, n, rng.randrange(1 << 20) * BS if kind == DATA else 0,
                          b""))
    return out


def _one_block_records(rng: random.Random, count: int, space: int) -> list[Record]:
    return [Record(DATA, 0, rng.randrange(space), 1, rng.randrange(1 << 20) * BS, b"")
            for _ in range(count)]


def test_segments_of_one_block_writes_apply_as_record_by_record(tmp_path, monkeypatch):
    """A segment of one-block writes goes into the map in block order with
    one putmulti (random 4 KiB writes); the map, every segment's live
    blocks and the segments left empty are exactly what applying it record
    by record gives, over a map of longer extents, with a block written
    twice in a segment, at an extent's first block, inside one, and at its
    last."""
    rng = random.Random(8)
    # lookups=False: as in the map's process, applied, not staged
    # (tests/engine/test_map_staged.py has the staged segments).
    fast = BlockMap(str(tmp_path / "fast"), BS, lookups=False)
    slow = BlockMap(str(tmp_path / "slow"), BS, lookups=False)
    try:
        space = 300
        for seq in range(1, 41):
            one_block = seq % 3 != 1
            records = (_one_block_records(rng, rng.randint(1, 60), space) if one_block
                       else _mixed_records(rng, rng.randint(1, 40), space))
            if one_block and seq % 2:
                records += records[:3]        # written again, later in the segment
            got = fast.apply_segment(_info(seq), records, applied_seq=str(seq).encode())
            with monkeypatch.context() as m:
                m.setattr(blockmap, "_single_writes", lambda records: False)
                want = slow.apply_segment(_info(seq), records, applied_seq=str(seq).encode())
            assert got == want
            assert list(fast.iter_extents()) == list(slow.iter_extents()), seq
            assert [(s.seq, s.live_blocks) for s in fast.segments()] == \
                [(s.seq, s.live_blocks) for s in slow.segments()], seq
        assert any(e.nblocks > 1 for e in fast.iter_extents())
    finally:
        fast.close()
        slow.close()


def test_segments_applied_in_a_batch_are_as_applied_one_by_one(tmp_path):
    """Several sealed segments go into the map in one transaction (the
    sealer's batches): the map, every segment's live blocks and the older
    segments left empty are exactly what applying them one after the other
    gives, with blocks written again by a later segment of the same batch,
    batches all of one-block writes and batches mixed with longer records."""
    rng = random.Random(11)
    batched = BlockMap(str(tmp_path / "batched"), BS, lookups=False)
    single = BlockMap(str(tmp_path / "single"), BS, lookups=False)
    try:
        space = 400
        seq = 1
        for round_ in range(30):
            batch = []
            for _ in range(rng.randint(1, 5)):
                records = (_mixed_records(rng, rng.randint(1, 40), space) if round_ % 4 == 3
                           else _one_block_records(rng, rng.randint(1, 80), space))
                batch.append((_info(seq), records))
                seq += 1
            got = batched.apply_segments([(_info(i.seq), r) for i, r in batch],
                                         applied_seq=str(seq - 1).encode())
            want: set[int] = set()
            for info, records in batch:
                want.update(single.apply_segment(info, records,
                                                 applied_seq=str(info.seq).encode()))
            assert set(got) == want - {i.seq for i, _ in batch}, round_
            assert list(batched.iter_extents()) == list(single.iter_extents()), round_
            assert [(s.seq, s.live_blocks) for s in batched.segments()] == \
                [(s.seq, s.live_blocks) for s in single.segments()], round_
            assert batched.get_int("applied_seq") == seq - 1
        assert any(s.live_blocks == 0 for s in single.segments())
    finally:
        batched.close()
        single.close()


def test_a_scratch_map_of_one_block_records_is_their_overlay(tmp_path):
    """overlay() of one-block records on a scratch map that holds only
    one-block entries replaces entries in one putmulti; once a record of
    several blocks comes, record by record.  Either way the map is the
    records laid over each other, holes as entries of seq 0."""
    rng = random.Random(9)
    fast = BlockMap(str(tmp_path / "fast"), BS, scratch=True)
    slow = BlockMap(str(tmp_path / "slow"), BS, scratch=True)
    map_testing.overlay_record_by_record(slow)
    try:
        for seq in range(1, 30):
            records = (_mixed_records(rng, 30, 200) if seq == 20 else
                       [r._replace(kind=TRIM, data_offset=0) if rng.random() < 0.2 else r
                        for r in _one_block_records(rng, 40, 200)])
            fast.overlay(seq, records)
            slow.overlay(seq, records)
            assert map_testing.overlays_one_block_entries(fast) == (seq < 20)
            assert list(fast.iter_extents()) == list(slow.iter_extents()), seq
        assert any(e.seq == 0 for e in fast.iter_extents())
    finally:
        fast.close()
        slow.close()
