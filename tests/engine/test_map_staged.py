"""Staged segments (lsbd.map.staged): segments of one-block writes enter the
map as arrays and are merged into the extents in block order, range by
range.  Every view of the map (lookups, extents, snapshots) equals a plain
model at every step; a merge cut short anywhere and done again (a crash)
leaves live counts equal to a recount; a staged segment is never counted
below its live blocks."""

from __future__ import annotations

import os
import random
import signal
from collections import Counter

import pytest
from engine_helpers import BS, MiB, open_test_store, read_all

from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd import linux
from lsbd.format.segment import DATA, TRIM, ZERO, Record
from lsbd.map import blockmap, merge, staged
from lsbd.map import testing as map_testing
from lsbd.map.blockmap import BlockMap, SegmentInfo
from lsbd.meta.config import create_volume

SPACE = 300      # blocks the writes fall in


@pytest.fixture
def small_merges(monkeypatch):
    """Merges after 3 staged segments, of 5 blocks a transaction, one a step."""
    monkeypatch.setattr(merge, "STAGE_SEGMENTS", 3)
    monkeypatch.setattr(merge, "MERGE_RANGE", 5)
    monkeypatch.setattr(merge, "MERGE_STEPS", 1)


def _info(seq: int) -> SegmentInfo:
    return SegmentInfo(seq=seq, state=blockmap.PENDING, sealed_ns=0, size=1, live_blocks=0,
                       data_blocks=1, trailer_crc=0)


def _segment(rng: random.Random, seq: int, mixed: bool) -> list[Record]:
    """Random one-block writes (some to the same block twice), or a mix of
    longer writes, zeroes and trims."""
    out = []
    for i in range(rng.randint(1, 40)):
        off = BS * (i + 1) * 64
        if not mixed:
            out.append(Record(DATA, 0, rng.randrange(SPACE), 1, off, b""))
            continue
        n = rng.randint(1, 20)
        lba = rng.randrange(SPACE - n)
        kind = rng.choice([DATA, DATA, DATA, ZERO, TRIM])
        out.append(Record(kind, 0, lba, n, off if kind == DATA else 0, b""))
    return out


def _lay(model: dict[int, tuple[int, int]], seq: int, records: list[Record]) -> None:
    for r in records:
        for i in range(r.nblocks):
            if r.kind == DATA:
                model[r.lba + i] = (seq, r.data_offset + i * BS)
            else:
                model.pop(r.lba + i, None)


def _blocks(extents) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    last = -1
    for e in extents:
        assert e.lba > last and e.nblocks > 0, "extents out of order or overlapping"
        last = e.lba + e.nblocks - 1
        for i in range(e.nblocks):
            out[e.lba + i] = (e.seq, e.offset + i * BS)
    return out


def _check(bm: BlockMap, model: dict[int, tuple[int, int]]) -> None:
    """Every view of the map is the model; no segment counted short."""
    assert {b: bm.lookup_block(b) for b in range(SPACE) if bm.lookup_block(b)} == model
    assert _blocks(bm.lookup(0, SPACE)) == model
    assert _blocks(bm.lookup(37, 91)) == {b: v for b, v in model.items() if 37 <= b < 128}
    assert _blocks(bm.iter_extents()) == model
    with bm.snapshot() as snap:
        assert _blocks(snap.extents()) == model
        assert [s.seq for s in snap.segments()] == [s.seq for s in bm.segments()]
    recount = Counter(seq for seq, _off in model.values())
    live = {s.seq: s.live_blocks for s in bm.segments()}
    for seq, n in recount.items():
        assert live.get(seq, 0) >= n, f"segment {seq} counted {live.get(seq)} < {n} live"
    assert bm.referenced_seqs() >= set(recount)


def _rows(bm: BlockMap) -> dict[int, int]:
    """The rows' own live counts (no staged writes added), those not 0."""
    return map_testing.segment_rows(bm)


def _merged_exactly(bm: BlockMap, model: dict[int, tuple[int, int]]) -> None:
    bm.merge_all()
    assert bm.staged_count() == 0
    assert map_testing.staged_values(bm) == []
    _check(bm, model)
    assert _rows(bm) == dict(Counter(seq for seq, _off in model.values()))


@pytest.mark.parametrize("offload", [False, True], ids=["here", "maps_process"])
@pytest.mark.parametrize("seed", range(3))
def test_staged_and_merged_segments_read_as_applied_one_by_one(tmp_path, small_merges,
                                                               seed, offload):
    rng = random.Random(seed)
    bm = BlockMap(str(tmp_path / "map"), BS)
    if offload:
        bm.offload_writes()
    model: dict[int, tuple[int, int]] = {}
    merges = 0
    try:
        for seq in range(1, 40):
            records = _segment(rng, seq, mixed=rng.random() < 0.15)
            before = bm.staged_count()
            bm.apply_segments([(_info(seq), records)], applied_seq=str(seq).encode())
            merges += bm.staged_count() < before
            _lay(model, seq, records)
            _check(bm, model)
            assert bm.get_int("applied_seq") == seq
        assert merges >= 3
        if offload:
            assert bm.offload_cpu_seconds > 0     # the child merged
        _merged_exactly(bm, model)
    finally:
        bm.close()


def _staged_map(tmp_path, rng, count: int) -> tuple[BlockMap, dict]:
    """A map with a few mixed segments applied, then `count` staged."""
    bm = BlockMap(str(tmp_path / "map"), BS)
    model: dict[int, tuple[int, int]] = {}
    for seq in range(1, count + 4):
        records = _segment(rng, seq, mixed=seq <= 3)
        bm.apply_segments([(_info(seq), records)], applied_seq=str(seq).encode())
        _lay(model, seq, records)
    assert bm.staged_count() == count
    return bm, model


@pytest.mark.parametrize("ranges_done", [0, 1, 3])
def test_a_merge_cut_short_reads_the_same_and_counts_once_when_done_again(
        tmp_path, monkeypatch, ranges_done):
    """A crash inside a merge: some ranges committed, the staged values not
    yet deleted.  The map reopened reads the same, and merging it all again
    counts every block once."""
    monkeypatch.setattr(merge, "MERGE_RANGE", 7)
    rng = random.Random(ranges_done)
    bm, model = _staged_map(tmp_path, rng, 6)
    top = bm.get_int("applied_seq")
    nxt, _ = bm.merge_ranges(top - 2, 0, ranges_done) if ranges_done else (0, [])
    assert nxt is not None
    bm.close()                                   # the crash: nothing more of the merge
    bm = BlockMap(str(tmp_path / "map"), BS)
    try:
        assert bm.staged_count() == 6
        _check(bm, model)
        _merged_exactly(bm, model)
    finally:
        bm.close()


def test_a_range_merged_twice_counts_its_blocks_once(tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "MERGE_RANGE", 7)
    bm, model = _staged_map(tmp_path, random.Random(9), 5)
    try:
        top = bm.get_int("applied_seq")
        assert bm.merge_ranges(top, 0, 2)[0] is not None
        once = (_rows(bm), list(bm.iter_extents()))
        txnid = map_testing.last_txnid(bm)
        bm.merge_ranges(top, 0, 2)
        assert (_rows(bm), list(bm.iter_extents())) == once
        # Done again, the ranges wrote nothing (a resumed merge costs lookups only).
        assert map_testing.last_txnid(bm) == txnid
        _check(bm, model)
        _merged_exactly(bm, model)
    finally:
        bm.close()


def test_the_last_range_deletes_exactly_the_merged_segments(tmp_path, monkeypatch):
    """A merge up to seq N leaves the segments staged after N staged."""
    monkeypatch.setattr(merge, "MERGE_RANGE", 7)
    bm, model = _staged_map(tmp_path, random.Random(4), 5)
    try:
        top = bm.get_int("applied_seq")
        map_testing.merge_upto(bm, top - 2)
        assert map_testing.staged_seqs(bm) == [top - 1, top]
        assert map_testing.staged_values(bm) == [top - 1, top]
        _check(bm, model)
        _merged_exactly(bm, model)
    finally:
        bm.close()


def test_a_snapshot_keeps_the_staged_writes_of_its_moment(tmp_path, small_merges):
    bm, model = _staged_map(tmp_path, random.Random(3), 2)
    try:
        then = dict(model)
        with bm.snapshot() as snap:
            top = bm.get_int("applied_seq")
            records = _segment(random.Random(8), top + 1, mixed=True)
            bm.apply_segments([(_info(top + 1), records)], applied_seq=str(top + 1).encode())
            assert bm.staged_count() == 2           # covered where it writes, not merged
            assert _blocks(snap.extents()) == then
        _lay(model, top + 1, records)
        _check(bm, model)
    finally:
        bm.close()


def test_loading_a_checkpoint_drops_the_staged_segments(tmp_path):
    bm, _model = _staged_map(tmp_path, random.Random(2), 3)
    try:
        bm.load([(10, 2, 1, 0)], [_info(1)], applied_seq=b"1")
        assert bm.staged_count() == 0
        assert list(bm.iter_extents()) == [blockmap.Extent(10, 2, 1, 0)]
        assert bm.lookup_block(11) == (1, BS)
    finally:
        bm.close()
    bm = BlockMap(str(tmp_path / "map"), BS)
    try:
        assert bm.staged_count() == 0
    finally:
        bm.close()


def test_the_maps_process_killed_inside_a_merge_loses_nothing(tmp_path, small_merges):
    rng = random.Random(11)
    bm = BlockMap(str(tmp_path / "map"), BS)
    bm.offload_writes()
    model: dict[int, tuple[int, int]] = {}
    try:
        for seq in range(1, 30):
            records = _segment(rng, seq, mixed=False)
            bm.apply_segments([(_info(seq), records)], applied_seq=str(seq).encode())
            _lay(model, seq, records)
            proc = map_testing.map_process(bm)
            if seq % 7 == 0 and proc is not None:
                os.kill(proc.pid, signal.SIGKILL)
            _check(bm, model)
        _merged_exactly(bm, model)
    finally:
        bm.close()


def test_a_staged_value_of_the_wrong_length_is_refused():
    value = staged.pack([1, 2], [BS, 2 * BS])
    assert [a.tolist() for a in staged.unpack(value)] == [[1, 2], [BS, 2 * BS]]
    with pytest.raises(ValueError):
        staged.unpack(value[:-1])


def test_a_staged_value_is_these_bytes():
    """docs/format.md "Staged segments": u32 LE count, the blocks, then the
    file offsets, each u64 LE, in record order."""
    assert staged.pack([5, 2], [0x1000, 0x3000]) == bytes.fromhex(
        "02000000" "0500000000000000" "0200000000000000"
        "0010000000000000" "0030000000000000")


def test_a_map_from_before_staging_opens_and_stages(tmp_path):
    """A cache dir's map written before the `staged` database existed
    (format 2: blocks, segments, meta) opens as it was, and stages on."""
    import lmdb

    from lsbd.map.encoding import MAP_FORMAT, key_of, value_of

    path = str(tmp_path / "old")
    env = lmdb.open(path, map_size=1 << 30, max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(key_of(7), value_of(3, 1, 0), db=env.open_db(b"blocks", txn=txn))
        txn.put(b"map_format", str(MAP_FORMAT).encode(), db=env.open_db(b"meta", txn=txn))
        env.open_db(b"segments", txn=txn)
    env.close()
    bm = BlockMap(path, BS)
    try:
        assert bm.staged_count() == 0
        assert [tuple(e) for e in bm.lookup(6, 5)] == [(7, 3, 1, 0)]
        bm.apply_segments([(_info(2), [Record(DATA, 0, 8, 1, 0, bytes(4))])],
                          applied_seq=b"2")
        assert bm.staged_count() == 1
        assert [tuple(e) for e in bm.lookup(6, 5)] == [(7, 1, 1, 0), (8, 1, 2, 0), (9, 1, 1, 2 * BS)]
    finally:
        bm.close()


def test_a_volume_of_random_writes_merges_and_reads_back(tmp_path, small_merges):
    """The engine over staged segments: reads, a close and reopen, the
    store alone, a checkpoint of a map with staged writes, and a point in
    the past."""
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", 4 * MiB, segment_size=64 * 1024, checkpoint_segments=10_000,
                  seal_interval=3600)
    cache = str(tmp_path / "cache")
    rng = random.Random(5)
    model = bytearray(4 * MiB)
    states = {}
    try:
        vol = Volume.open(store, "vol", cache_root=cache)
        counts, merging = [], []
        for r in range(12):
            for _ in range(50):
                lba = rng.randrange(SPACE)
                data = bytes([rng.randrange(1, 256)]) * BS
                vol.write(lba * BS, data)
                model[lba * BS:(lba + 1) * BS] = data
            testing.seal_now(vol)
            counts.append(testing.staged_segments(vol))
            merging.append(testing.map_merging(vol))
            if r % 4 == 1:
                states[vol.checkpoint()] = bytes(model)
            assert read_all(vol) == model
        # Reads met staged segments, merges of several steps ran, and the
        # staged segments stayed bounded (a merge is finished at once when
        # as many again are staged behind it).
        assert 0 < max(counts) <= 2 * merge.STAGE_SEGMENTS
        assert any(merging)
        assert testing.staged_segments(vol) > 0
        vol.close()
        vol = Volume.open(store, "vol", cache_root=cache)
        # A clean close merged them all: the rows count exactly the extents.
        assert testing.staged_segments(vol) == 0
        assert testing.map_live_rows(vol) == testing.map_recount(vol)
        assert read_all(vol) == model
        vol.close()
        vol = Volume.open(store, "vol", cache_root=str(tmp_path / "other"), read_only=True)
        assert read_all(vol) == model
        vol.close()
        for seq, state in states.items():
            with Volume.open(store, "vol", cache_root=cache, at_seq=seq) as past:
                assert read_all(past) == state
    finally:
        store.close()


def _spread_map(tmp_path, spread: bool) -> BlockMap:
    """A map of 20,000 one-block extents over 2 million blocks, then 3
    staged segments of 3,000 writes each: spread over every block the map
    covers, or all within its first 5,000 blocks."""
    bm = BlockMap(str(tmp_path / "map"), BS)
    rng = random.Random(5)
    base = [Record(DATA, 0, lba, 1, BS * (i + 1), b"")
            for i, lba in enumerate(sorted(rng.sample(range(2_000_000), 20_000)))]
    bm.apply_segment(_info(1), base, applied_seq=b"1")
    bm.merge_all()                            # into the extents
    for seq in (2, 3, 4):
        lbas = rng.sample(range(2_000_000) if spread else range(5_000), 3_000)
        bm.apply_segment(_info(seq), [Record(DATA, 0, lba, 1, BS * (i + 1), b"")
                                      for i, lba in enumerate(lbas)],
                         applied_seq=str(seq).encode())
    assert bm.staged_count() == 3
    return bm


@pytest.mark.parametrize("spread", [True, False])
def test_a_merge_of_writes_spread_over_the_map_reads_the_map_file_ahead(
        tmp_path, monkeypatch, spread):
    """merge_all of staged writes that touch most of the extents' leaf pages
    asks the kernel for the whole map file first (from a cold page cache
    the merge would fault its pages in one at a time); writes that touch a
    few pages ask for nothing.  Either way the map reads as applied."""
    monkeypatch.setattr(merge, "MERGE_RANGE", 1000)
    bm = _spread_map(tmp_path, spread)
    asked: list[tuple[str, int, int]] = []
    real = linux.will_need

    def will_need(fd, start, length):
        asked.append((os.readlink(f"/proc/self/fd/{fd}"), start, length - os.fstat(fd).st_size))
        return real(fd, start, length)

    monkeypatch.setattr(linux, "will_need", will_need)
    try:
        before = {e.lba: (e.seq, e.offset) for e in bm.lookup(0, 2_000_000)}
        bm.merge_all()
        assert bm.staged_count() == 0
        assert {e.lba: (e.seq, e.offset) for e in bm.lookup(0, 2_000_000)} == before
        whole = (os.path.realpath(tmp_path / "map" / "data.mdb"), 0, 0)   # all of it
        assert asked == ([whole] if spread else [])
    finally:
        bm.close()
