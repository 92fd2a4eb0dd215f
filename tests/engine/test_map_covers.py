"""Covers (lsbd.map.staged, docs/format.md "Covers"): a segment of longer
records laid over the extents while one-block writes are staged merges
nothing; the staged writes in the blocks it covers are dead from its
commit on, in every view of the map (lookups, extents, snapshots, a
reopen, a merge up to a seq older than the cover) and in the live counts,
while staged writes newer than it stay the newest."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from engine_helpers import BS
from test_map_staged import SPACE, _blocks, _check, _info, _lay, _merged_exactly, _rows, \
    _segment, _staged_map

from lsbd.format.segment import DATA, RESIZE, TRIM, ZERO, Record
from lsbd.map import merge, staged
from lsbd.map import testing as map_testing
from lsbd.map.blockmap import BlockMap
from lsbd.map.offload import MapProcess, OffloadUnavailable

@pytest.fixture
def small_merges(monkeypatch):
    """Merges after 3 staged segments, of 5 blocks a transaction, one a step."""
    monkeypatch.setattr(merge, "STAGE_SEGMENTS", 3)
    monkeypatch.setattr(merge, "MERGE_RANGE", 5)
    monkeypatch.setattr(merge, "MERGE_STEPS", 1)


#: A trim from here to far past SPACE (2^28 blocks: never made an array of blocks).
TRIM_FROM = 250


def _long(seq: int) -> list[Record]:
    """A segment of longer records over blocks that staged writes hold."""
    return [Record(DATA, 0, 10, 60, 64 * BS, b""), Record(ZERO, 0, 100, 30, 0, b""),
            Record(DATA, 0, 150, 1, 200 * BS, b""), Record(DATA, 0, 120, 40, 300 * BS, b""),
            Record(RESIZE, 0, 1 << 40, 0, 0, b""),
            Record(TRIM, 0, TRIM_FROM, 1 << 28, 0, b"")]


def _lay_long(model: dict, seq: int) -> None:
    records = _long(seq)
    _lay(model, seq, records[:4])
    for b in [b for b in model if b >= TRIM_FROM]:
        del model[b]


def _cover(bm: BlockMap, model: dict) -> int:
    """Apply _long as the next segment; its seq."""
    seq = bm.get_int("applied_seq") + 1
    before = bm.staged_count()
    bm.apply_segments([(_info(seq), _long(seq))], applied_seq=str(seq).encode())
    assert bm.staged_count() == before          # nothing merged
    _lay_long(model, seq)
    return seq


def _staged_blocks_under(bm: BlockMap, seq: int) -> int:
    """Staged writes older than `seq` inside _long's blocks (all of them)."""
    return sum(int(((lbas >= 10) & (lbas < 160) | (lbas >= TRIM_FROM)).sum())
               for _s, lbas, _o in map_testing.staged_writes(bm, seq))


@pytest.mark.parametrize("offload", [False, True], ids=["here", "maps_process"])
def test_a_long_record_over_staged_writes_reads_back_the_record(tmp_path, offload):
    bm, model = _staged_map(tmp_path, random.Random(21), 6)
    if offload:
        bm.offload_writes()
    try:
        seq = _cover(bm, model)
        assert _staged_blocks_under(bm, seq) > 20       # the test covers something
        _check(bm, model)
        assert _blocks(bm.lookup(0, 1 << 30)) == model
        # Staged writes newer than the cover in its blocks are the newest.
        for s in (seq + 1, seq + 2):
            records = [Record(DATA, 0, lba, 1, (i + 1) * BS, b"")
                       for i, lba in enumerate((12, 105, 140, 151, 299, 12))]
            bm.apply_segments([(_info(s), records)], applied_seq=str(s).encode())
            _lay(model, s, records)
            _check(bm, model)
        _merged_exactly(bm, model)
    finally:
        bm.close()


def test_a_cover_holds_after_a_reopen_and_a_merge_up_to_an_older_seq(tmp_path, monkeypatch):
    """The map closed (a crash: nothing merged) with a cover in it reads
    the same reopened; a merge up to a seq older than the cover merges
    none of what it covers, nor does it drop the cover while older staged
    writes remain; the rows end as a recount."""
    monkeypatch.setattr(merge, "MERGE_RANGE", 7)
    bm, model = _staged_map(tmp_path, random.Random(22), 6)
    first = map_testing.staged_seqs(bm)[0]
    try:
        seq = _cover(bm, model)
        rng = random.Random(3)
        for s in (seq + 1, seq + 2):          # staged after the cover
            records = _segment(rng, s, mixed=False)
            bm.apply_segments([(_info(s), records)], applied_seq=str(s).encode())
            _lay(model, s, records)
    finally:
        bm.close()
    bm = BlockMap(str(tmp_path / "map"), BS)
    try:
        assert bm.staged_count() == 8
        _check(bm, model)
        map_testing.merge_upto(bm, first + 2)       # older than the cover
        assert bm.staged_count() == 5
        _check(bm, model)
        assert [c[0] for c in map_testing.covers(bm)] == [seq]
        bm.close()
        bm = BlockMap(str(tmp_path / "map"), BS)
        _check(bm, model)
        _merged_exactly(bm, model)
        assert map_testing.covers(bm) == []        # gone with the last staged value
    finally:
        bm.close()


@pytest.mark.parametrize("offload", [False, True], ids=["here", "maps_process"])
def test_a_cover_during_a_merge_under_way(tmp_path, small_merges, offload):
    """A segment of longer records between two steps of a merge: the steps
    after it merge none of what it covers (the merge's loaded writes lose
    them too, in the map's process as well)."""
    bm, model = _staged_map(tmp_path, random.Random(23), 2)
    if offload:
        bm.offload_writes()
    try:
        rng = random.Random(6)
        for _ in range(3):                           # a third staged: the merge starts
            s = bm.get_int("applied_seq") + 1
            records = _segment(rng, s, mixed=False)
            bm.apply_segments([(_info(s), records)], applied_seq=str(s).encode())
            _lay(model, s, records)
        assert map_testing.merging(bm)
        _cover(bm, model)
        _check(bm, model)
        while map_testing.merging(bm):
            map_testing.merge_steps(bm, 1)
            _check(bm, model)
        _merged_exactly(bm, model)
    finally:
        bm.close()


def test_a_batch_of_several_segments_covers_with_each(tmp_path):
    """One-block writes applied in a batch with longer records (not staged:
    laid over the extents) cover the older staged writes too, each from its
    own seq on."""
    bm, model = _staged_map(tmp_path, random.Random(24), 4)
    try:
        top = bm.get_int("applied_seq")
        singles = [Record(DATA, 0, lba, 1, (i + 1) * BS, b"")
                   for i, lba in enumerate(range(0, SPACE, 3))]
        batch = [(_info(top + 1), singles), (_info(top + 2), _long(top + 2)),
                 (_info(top + 3), singles[::2])]
        bm.apply_segments(batch, applied_seq=str(top + 3).encode())
        _lay(model, top + 1, singles)
        _lay_long(model, top + 2)
        _lay(model, top + 3, singles[::2])
        _check(bm, model)
        _merged_exactly(bm, model)
    finally:
        bm.close()


def test_the_maps_process_dead_after_its_commit_leaves_no_covered_write(
        tmp_path, monkeypatch):
    """The map's process commits a cover and dies before it says so: the
    batch applied here again is found applied, and lookups lose the
    covered writes all the same."""
    bm, model = _staged_map(tmp_path, random.Random(25), 5)
    bm.offload_writes()
    real = MapProcess.apply

    def apply_then_die(self, batch, meta):
        real(self, batch, meta)
        self._stop()
        self.failures += 1
        raise OffloadUnavailable("killed after its commit")

    monkeypatch.setattr(MapProcess, "apply", apply_then_die)
    try:
        _cover(bm, model)
        _check(bm, model)
        _merged_exactly(bm, model)
    finally:
        bm.close()


@pytest.mark.parametrize("seed", range(3))
def test_live_counts_equal_a_recount_whatever_the_covers(tmp_path, small_merges, seed):
    """Segments of longer records among staged ones, at random: never a
    segment counted short, and once everything is merged (now and then)
    the rows count exactly the blocks each segment holds."""
    rng = random.Random(seed)
    bm = BlockMap(str(tmp_path / "map"), BS)
    model: dict[int, tuple[int, int]] = {}
    try:
        for seq in range(1, 60):
            records = _segment(rng, seq, mixed=rng.random() < 0.3)
            bm.apply_segments([(_info(seq), records)], applied_seq=str(seq).encode())
            _lay(model, seq, records)
            _check(bm, model)
            if seq % 20 == 0:
                _merged_exactly(bm, model)
                assert _rows(bm) == dict(Counter(s for s, _off in model.values()))
        _merged_exactly(bm, model)
    finally:
        bm.close()


def test_cover_ranges_are_sorted_and_disjoint():
    starts, ends = staged.cover_ranges([10, 0, 5, 20, 3, 7], [12, 5, 7, 25, 4, 8])
    assert (starts.tolist(), ends.tolist()) == ([0, 10, 20], [8, 12, 25])


def test_a_cover_is_these_bytes():
    """docs/format.md "Covers": u32 LE count, the starts, then the ends,
    each u64 LE."""
    assert staged.pack_cover([5, 0x1000], [7, 0x1000 + (1 << 28)]) == bytes.fromhex(
        "02000000" "0500000000000000" "0010000000000000"
        "0700000000000000" "0010001000000000")
    with pytest.raises(ValueError):
        staged.unpack_cover(staged.pack_cover([1], [2])[:-1])
