"""A volume's history at the engine level: the pure planning functions
(parse_time, seq_at, plan_restore, changed_ranges) and snapshots, past
states and clones through lsbd.engine.volume.Volume."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from itertools import islice, pairwise
from typing import ClassVar

import pytest
from history_helpers import (
    BS,
    MiB,
    Model,
    apply_ops,
    open_url,
    read_volume,
    run,
    wipe,
    write_and_close,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from lsbd.segments import checkpoints as ckpt
from lsbd.meta.config import create_volume, load_config
from lsbd.plans.restore import BadPoint, changed_ranges, parse_time, plan_restore, seq_at
from lsbd.meta.snapshots import (
    SnapshotExists,
    SnapshotNotFound,
    check_snapshot_name,
    delete_snapshot,
    list_snapshots,
    read_snapshot,
    write_snapshot,
)
from lsbd.segments.remote import segment_times
from lsbd.segments.remote import store_segment_seqs
from lsbd.engine.volume import Volume
from lsbd.errors import UserError

SIZE = 16 * MiB
NOW = 1_800_000_000.0


# ----------------------------------------------------------------- parse_time

class TestParseTime:
    def test_now(self):
        assert parse_time("now", now=NOW) == NOW
        assert parse_time("  now ", now=NOW) == NOW

    @pytest.mark.parametrize("text, seconds", [
        ("-30s", 30), ("-1s", 1), ("-15m", 900), ("-2h", 7200), ("-1d", 86400),
        ("-1w", 604800), ("-1.5h", 5400), ("-0s", 0), ("-90m", 5400),
    ])
    def test_relative(self, text, seconds):
        assert parse_time(text, now=NOW) == pytest.approx(NOW - seconds)

    def test_relative_uses_the_clock_when_now_is_not_given(self):
        before = time.time()
        t = parse_time("-1h")
        after = time.time()
        assert before - 3600 <= t <= after - 3600

    def test_iso_utc_z_and_offset(self):
        base = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC).timestamp()
        assert parse_time("2026-11-25T10:00:00Z") == base
        assert parse_time("2026-11-25T10:00:00+00:00") == base
        assert parse_time("2026-11-25T11:30:00+01:30") == base
        assert parse_time("2026-11-25T10:00:07.25Z") == base + 7.25
        assert parse_time("2026-11-25T10:00Z") == base  # no seconds

    def test_iso_without_zone_is_local_time(self):
        naive = datetime(2026, 11, 25, 10, 0, 0)
        assert parse_time("2026-11-25T10:00:00") == naive.astimezone().timestamp()
        assert parse_time("2026-11-25 10:00:00") == naive.astimezone().timestamp()

    @pytest.mark.parametrize("text", ["", "yesterday", "15m", "+15m", "-15", "-15x", "-m",
                                      "2026-13-01T00:00:00", "10:00:00Z", "--15m"])
    def test_bad_times_are_user_errors(self, text):
        with pytest.raises(UserError, match="bad time"):
            parse_time(text, now=NOW)


# ----------------------------------------------------------------- seq_at

def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class TestSeqAt:
    TIMES: ClassVar[dict[int, int]] = {1: _ns(1000), 2: _ns(1010), 3: _ns(1020), 4: _ns(1020.5)}

    def test_no_segments_is_the_empty_volume(self):
        assert seq_at({}, 1500, created=1000, now=2000) == 0

    @pytest.mark.parametrize("when, seq", [
        (999.5, 0),      # after creation, before the first segment
        (1000, 1),       # exactly at a sealed time: included
        (1000.4, 1), (1009.999, 1), (1010, 2), (1015, 2),
        (1020.25, 3), (1020.5, 4), (1999, 4), (2000, 4), (2000.9, 4),
    ])
    def test_last_seq_sealed_at_or_before(self, when, seq):
        assert seq_at(self.TIMES, when, created=990, now=2000) == seq

    def test_order_of_the_mapping_does_not_matter(self):
        shuffled = dict(reversed(list(self.TIMES.items())))
        assert seq_at(shuffled, 1012, created=990, now=2000) == 2

    def test_before_creation_is_refused(self):
        with pytest.raises(BadPoint, match="before the volume was created"):
            seq_at(self.TIMES, 989.99, created=990, now=2000)

    def test_exactly_at_creation_is_allowed(self):
        assert seq_at(self.TIMES, 990, created=990, now=2000) == 0

    def test_future_is_refused(self):
        with pytest.raises(BadPoint, match="in the future"):
            seq_at(self.TIMES, 2001.5, created=990, now=2000)

    def test_gaps_left_by_reclaimed_segments(self):
        # Segments 1 and 2 reclaimed: the mapping only has what is still stored.
        times = {3: _ns(1020), 5: _ns(1040)}
        assert seq_at(times, 1030, created=990, now=2000) == 3
        assert seq_at(times, 1045, created=990, now=2000) == 5


# ----------------------------------------------------------------- plan_restore

class TestPlanRestore:
    SEGS: ClassVar[dict[int, int]] = {s: 1000 * s for s in range(1, 11)}  # seq -> object size

    def test_no_checkpoint_replays_from_the_empty_volume(self):
        plan = plan_restore([], self.SEGS, 4)
        assert plan.target == 4
        assert plan.checkpoint is None
        assert plan.segments == [1, 2, 3, 4]
        assert plan.index_bytes == 1000 + 2000 + 3000 + 4000
        assert any("empty volume" in line for line in plan.describe())

    def test_newest_checkpoint_at_or_before_the_target(self):
        plan = plan_restore([2, 5, 8], self.SEGS, 7)
        assert plan.checkpoint == 5
        assert plan.segments == [6, 7]
        text = "\n".join(plan.describe())
        assert "checkpoint 5" in text and "6..7" in text and "replay 2 segments" in text

    def test_target_on_a_checkpoint_replays_nothing(self):
        plan = plan_restore([3, 6], self.SEGS, 6)
        assert plan.checkpoint == 6
        assert plan.segments == []
        assert plan.index_bytes == 0
        assert "replay no segments" in plan.describe()

    def test_checkpoints_after_the_target_are_not_used(self):
        plan = plan_restore([9, 10], self.SEGS, 3)
        assert plan.checkpoint is None and plan.segments == [1, 2, 3]

    def test_target_zero_is_the_empty_volume(self):
        plan = plan_restore([], {}, 0)
        assert plan.checkpoint is None and plan.segments == [] and plan.index_bytes == 0

    def test_segments_before_the_checkpoint_may_be_gone(self):
        segs = {s: 10 for s in range(5, 9)}
        plan = plan_restore([4], segs, 8)
        assert plan.checkpoint == 4 and plan.segments == [5, 6, 7, 8]

    def test_a_missing_segment_makes_the_point_unreachable(self):
        segs = {s: 10 for s in (1, 2, 4, 5)}
        with pytest.raises(BadPoint, match="segment 3 was"):
            plan_restore([], segs, 5)
        # ... unless a checkpoint after the gap covers it.
        assert plan_restore([3], segs, 5).segments == [4, 5]
        # A point before the gap is fine.
        assert plan_restore([], segs, 2).segments == [1, 2]

    def test_a_target_past_the_newest_segment(self):
        with pytest.raises(BadPoint):
            plan_restore([], {1: 10, 2: 10}, 3)

    def test_index_bytes_are_capped_per_segment(self):
        segs = {1: 10 * MiB, 2: 100}
        assert plan_restore([], segs, 2).index_bytes == 64 * 1024 + 100

    def test_clone_base(self):
        # A clone of seq 5: its own segments start at 6; the parent's are not in `segments`.
        segs = {6: 10, 7: 10, 8: 10}
        plan = plan_restore([], segs, 8, base=5)
        assert plan.checkpoint is None and plan.segments == [6, 7, 8]
        plan = plan_restore([], segs, 5, base=5)
        assert plan.segments == [] and plan.target == 5
        # A checkpoint of its own is used; one before the base is not.
        assert plan_restore([3, 7], segs, 8, base=5).checkpoint == 7
        assert plan_restore([3], segs, 8, base=5).checkpoint is None
        with pytest.raises(BadPoint, match="before this volume's history"):
            plan_restore([], segs, 4, base=5)


# ----------------------------------------------------------------- changed_ranges

def _cr(old, new):
    return list(changed_ranges(old, new, block_size=BS))


class TestChangedRanges:
    def test_empty_maps(self):
        assert _cr([], []) == []

    def test_everything_is_new(self):
        assert _cr([], [(0, 4, 1, 0), (10, 2, 1, 4 * BS)]) == [(0, 4), (10, 12)]

    def test_everything_is_gone(self):
        assert _cr([(3, 5, 1, 0)], []) == [(3, 8)]

    def test_identical_maps(self):
        m = [(0, 4, 1, 0), (8, 4, 2, 100)]
        assert _cr(m, m) == []

    def test_split_extents_with_contiguous_offsets_are_the_same_place(self):
        old = [(0, 10, 1, 512)]
        new = [(0, 3, 1, 512), (3, 7, 1, 512 + 3 * BS)]
        assert _cr(old, new) == []
        assert _cr(new, old) == []

    def test_a_piece_rewritten_in_the_middle(self):
        old = [(0, 10, 1, 0)]
        new = [(0, 3, 1, 0), (3, 2, 2, 0), (5, 5, 1, 5 * BS)]
        assert _cr(old, new) == [(3, 5)]

    def test_adjacent_changes_merge_into_one_range(self):
        old = [(0, 2, 1, 0)]
        new = [(0, 2, 2, 0), (2, 3, 3, 0)]  # rewritten, then new data right after it
        assert _cr(old, new) == [(0, 5)]

    def test_adjacent_extents_in_the_old_map_one_hole_in_the_new(self):
        old = [(0, 2, 1, 0), (2, 2, 2, 0)]
        assert _cr(old, []) == [(0, 4)]

    def test_same_segment_other_offset_is_a_change(self):
        assert _cr([(0, 2, 1, 0)], [(0, 2, 1, 8 * BS)]) == [(0, 2)]

    def test_same_offset_other_segment_is_a_change(self):
        assert _cr([(0, 2, 1, 0)], [(0, 2, 2, 0)]) == [(0, 2)]

    def test_holes_on_both_sides_are_no_change(self):
        old = [(0, 1, 1, 0), (100, 1, 1, BS)]
        new = [(0, 1, 1, 0), (50, 1, 2, 0), (100, 1, 1, BS)]
        assert _cr(old, new) == [(50, 51)]

    def test_data_to_hole_and_hole_to_data(self):
        old = [(0, 4, 1, 0)]
        new = [(2, 4, 1, 2 * BS)]  # blocks 0-1 trimmed, 4-5 new
        # Blocks 2-3 are the same place; 4-5 are new (mapped only in new).
        assert _cr(old, new) == [(0, 2), (4, 6)]

    def test_partial_overlaps(self):
        old = [(0, 6, 1, 0)]
        new = [(4, 4, 2, 0)]
        assert _cr(old, new) == [(0, 8)]

    def test_ranges_are_sorted_and_disjoint(self):
        old = [(0, 3, 1, 0), (5, 3, 1, 3 * BS), (20, 1, 1, 6 * BS)]
        new = [(1, 1, 2, 0), (6, 10, 2, BS), (30, 1, 2, 11 * BS)]
        out = _cr(old, new)
        assert out == [(0, 3), (5, 16), (20, 21), (30, 31)]


def _brute_force(old, new) -> set[int]:
    def places(m):
        out = {}
        for lba, n, seq, off in m:
            for i in range(n):
                out[lba + i] = (seq, off + i * BS)
        return out

    a, b = places(old), places(new)
    return {blk for blk in set(a) | set(b) if a.get(blk) != b.get(blk)}


@st.composite
def block_maps(draw, blocks=40):
    """Sorted, non-overlapping (lba, n, seq, offset) extents over `blocks` blocks."""
    out = []
    pos = draw(st.integers(0, 5))
    while pos < blocks:
        n = draw(st.integers(1, min(6, blocks - pos)))
        seq = draw(st.integers(1, 3))
        off = draw(st.integers(0, 4)) * BS
        out.append((pos, n, seq, off))
        pos += n + draw(st.integers(0, 4))
    return out


@settings(max_examples=300, deadline=None)
@given(block_maps(), block_maps(), st.booleans())
def test_changed_ranges_equals_a_block_by_block_comparison(old, new, share):
    if share:
        # Make some extents literally shared, and some split copies of old ones.
        new = sorted({*new[::2], *old[1::3]})
        merged = []
        for e in new:  # drop overlaps
            if not merged or e[0] >= merged[-1][0] + merged[-1][1]:
                merged.append(e)
        new = merged
    out = list(changed_ranges(old, new, block_size=BS))
    blocks_out = {b for lo, hi in out for b in range(lo, hi)}
    assert blocks_out == _brute_force(old, new)
    # Maximal ranges: sorted, never touching.
    for (lo1, hi1), (lo2, hi2) in pairwise(out):
        assert lo1 < hi1 < lo2 < hi2


def test_changed_ranges_is_lazy_over_long_maps():
    """diff and export --from stream: each range comes out after reading only
    the extents up to it, so memory does not grow with the maps.  Two long
    maps that differ in every other extent give their first ranges at once."""
    read = {"old": 0, "new": 0}

    def endless(which, seq):
        n = 0
        while n < 200_000:   # long enough that reading it all shows
            read[which] += 1
            # Every extent 4 blocks long; the new map rewrote every second one.
            yield (n * 8, 4, seq if which == "old" or n % 2 else seq + 1, n * 4 * BS)
            n += 1

    out = changed_ranges(endless("old", 1), endless("new", 1), block_size=BS)
    first = list(islice(out, 3))
    assert first == [(0, 4), (16, 20), (32, 36)]
    assert read["old"] <= 7 and read["new"] <= 7, read


# ----------------------------------------------------------------- snapshots (objects)

def test_snapshot_names():
    for good in ("s1", "daily.2026-11-25", "A_b-c.d", "x" * 128):
        assert check_snapshot_name(good) == good
    for bad in ("", "-x", ".hidden", "a/b", "a b", "x" * 129, "é"):
        with pytest.raises(UserError, match="bad snapshot name"):
            check_snapshot_name(bad)


def test_snapshot_objects_write_read_list_delete(tmp_path):
    store = open_url("file://" + str(tmp_path / "store"))
    config = create_volume(store, "vol", SIZE)
    write_snapshot(store, config, "b", 7)
    write_snapshot(store, config, "a", 9)
    write_snapshot(store, config, "c", 3)
    with pytest.raises(SnapshotExists):
        write_snapshot(store, config, "a", 10)
    assert read_snapshot(store, config, "a").seq == 9  # the loser changed nothing
    snaps = list_snapshots(store, config)
    assert [(s.name, s.seq) for s in snaps] == [("c", 3), ("b", 7), ("a", 9)]
    assert all(s.volume_id == config.volume_id for s in snaps)
    delete_snapshot(store, config, "b")
    with pytest.raises(SnapshotNotFound, match="'b'"):
        read_snapshot(store, config, "b")
    with pytest.raises(SnapshotNotFound):
        delete_snapshot(store, config, "b")
    assert [s.name for s in list_snapshots(store, config)] == ["c", "a"]


# ----------------------------------------------------------------- past states via Volume

@pytest.fixture
def store(store_url):
    s = open_url(store_url)
    yield s
    s.close()


OPS_A = [("write", 0, 8, 1), ("write", 100, 16, 2), ("write", 3000, 4, 3)]
OPS_B = [("write", 4, 8, 11), ("trim", 100, 4, ), ("write", 2000, 3, 12)]
OPS_C = [("write", 0, 2, 21), ("zero", 106, 2), ("write", 4090, 6, 22)]


def test_snapshots_taken_by_an_open_writer_read_back_exactly(store, tmp_path):
    """Volume.snapshot flushes to the store first: each snapshot holds exactly
    the writes before it, for a reader with an empty cache, and the live
    volume goes on."""
    create_volume(store, "vol", SIZE)
    cache = tmp_path / "cache"
    model = Model(SIZE)
    vol = Volume.open(store, "vol", cache_root=str(cache))
    try:
        apply_ops(vol, model, OPS_A)
        s1 = vol.snapshot("s1")
        a = model.bytes()
        apply_ops(vol, model, OPS_B)
        s2 = vol.snapshot("s2")
        ab = model.bytes()
        apply_ops(vol, model, OPS_C)
        # Readers of past states while the writer holds the volume.
        assert read_volume(store, "vol", tmp_path / "r1", at_seq=s1.seq) == a
        assert read_volume(store, "vol", tmp_path / "r2", at_seq=s2.seq) == ab
    finally:
        vol.close()
    assert 0 < s1.seq < s2.seq
    config = load_config(store, "vol")
    assert [(s.name, s.seq) for s in list_snapshots(store, config)] == [("s1", s1.seq),
                                                                        ("s2", s2.seq)]
    wipe(cache)
    assert read_volume(store, "vol", tmp_path / "r3", at_seq=s1.seq) == a
    assert read_volume(store, "vol", tmp_path / "r4", at_seq=s2.seq) == ab
    assert read_volume(store, "vol", tmp_path / "r5") == model.bytes()


def test_snapshot_name_taken_twice_is_refused_by_the_writer(tmp_path):
    store = open_url("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", SIZE)
    with Volume.open(store, "vol", cache_root=str(tmp_path / "c")) as vol:
        apply_ops(vol, None, OPS_A)
        first = vol.snapshot("s")
        apply_ops(vol, None, OPS_B)
        with pytest.raises(SnapshotExists):
            vol.snapshot("s")
    assert read_snapshot(store, load_config(store, "vol"), "s").seq == first.seq


def test_every_seq_is_a_point_and_segment_times_order_them(tmp_path):
    """One segment per close: the state at seq k is exactly the model after
    k batches, segment_times is increasing, and seq_at maps each sealed time
    back to its seq; plan_restore on the real store reaches every seq."""
    store = open_url("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", SIZE)
    cache = tmp_path / "cache"
    model = Model(SIZE)
    states = {0: model.bytes()}
    batches = [OPS_A, OPS_B, OPS_C, [("write", 50, 50, 31)]]
    for i, ops in enumerate(batches):
        write_and_close(store, "vol", cache, model, ops)
        states[max(store_segment_seqs(store, "vol"))] = model.bytes()
        if i == 1:   # a checkpoint in the middle (a close of so few segments writes none)
            vol = Volume.open(store, "vol", cache_root=str(cache))
            vol.checkpoint()
            vol.close()
    config = load_config(store, "vol")
    times = segment_times(store, config)
    assert sorted(times) == sorted(store_segment_seqs(store, "vol"))
    seqs = sorted(times)
    assert [times[s] for s in seqs] == sorted(times[s] for s in seqs)
    for seq, expected in states.items():
        assert read_volume(store, "vol", tmp_path / f"r{seq}", at_seq=seq) == expected
        if seq:
            assert seq_at(times, times[seq] / 1e9 + 1e-4, created=config.created) == seq
    checkpoints = ckpt.list_checkpoints(store, "vol")
    assert len(checkpoints) == 1, checkpoints
    for seq in states:
        plan = plan_restore(checkpoints, store_segment_seqs(store, "vol"), seq)
        assert plan.segments == list(range((plan.checkpoint or 0) + 1, seq + 1))


def test_changed_ranges_on_real_maps(tmp_path):
    """The maps of two real points differ exactly where the test wrote between
    them: data over data, data into holes, zeroes and trims over data; zeroes
    and trims of holes and re-reading change nothing."""
    store = open_url("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", SIZE)
    cache = tmp_path / "cache"
    write_and_close(store, "vol", cache, None, [("write", 0, 64, 1), ("write", 1000, 10, 2)])
    old = max(store_segment_seqs(store, "vol"))
    write_and_close(store, "vol", cache, None, [
        ("write", 10, 4, 3), ("write", 14, 2, 4),     # adjacent: one range 10..16
        ("zero", 30, 2),                              # data -> hole
        ("trim", 1005, 5),                            # data -> hole
        ("write", 500, 1, 5),                         # hole -> data
        ("zero", 2000, 8), ("trim", 3000, 8),         # hole -> hole: no change
    ])
    new = max(store_segment_seqs(store, "vol"))
    a = Volume.open(store, "vol", cache_root=str(tmp_path / "ra"), at_seq=old)
    b = Volume.open(store, "vol", cache_root=str(tmp_path / "rb"), at_seq=new)
    try:
        out = list(changed_ranges(a.extents(), b.extents(), block_size=BS))
    finally:
        a.close()
        b.close()
    assert out == [(10, 16), (30, 32), (500, 501), (1005, 1010)]


# ----------------------------------------------------------------- clones

@pytest.fixture
def cloned(store_url, tmp_path):
    """vol: A, snapshot s1, then B; clone of vol at s1 made with `lsbd clone`."""
    store = open_url(store_url)
    cache = tmp_path / "cache"
    run(store_url, cache, "create", "vol", "--size", "16M", check=True)
    model = Model(SIZE)
    write_and_close(store, "vol", cache, model, OPS_A)
    a = model.copy()
    run(store_url, cache, "snapshot", "create", "vol", "s1", check=True)
    write_and_close(store, "vol", cache, model, OPS_B)
    run(store_url, cache, "clone", "vol", "clone", "--snapshot", "s1", check=True)
    yield store, cache, a, model
    store.close()


def test_clone_is_independent_and_survives_crashes(cloned, tmp_path):
    store, cache, clone_model, vol_model = cloned
    assert read_volume(store, "clone", tmp_path / "r0") == clone_model.bytes()

    # Writes to the clone, then a crash (after a journal flush) and a reopen.
    vol = Volume.open(store, "clone", cache_root=str(cache))
    apply_ops(vol, clone_model, [("write", 6, 4, 40), ("write", 3002, 4, 41)])
    vol.flush()
    vol.abandon()
    vol = Volume.open(store, "clone", cache_root=str(cache), break_lease=True)
    try:
        assert vol.read(0, SIZE // 2) == clone_model.bytes()[:SIZE // 2]
        apply_ops(vol, clone_model, [("write", 200, 3, 42)])
    finally:
        vol.close()

    # Writes to the parent after the clone, a crash, a reopen.
    vol = Volume.open(store, "vol", cache_root=str(cache))
    apply_ops(vol, vol_model, [("write", 0, 4, 50), ("write", 200, 5, 51)])
    vol.flush()
    vol.abandon()
    vol = Volume.open(store, "vol", cache_root=str(cache), break_lease=True)
    vol.close()

    assert read_volume(store, "clone", tmp_path / "r1") == clone_model.bytes()
    assert read_volume(store, "vol", tmp_path / "r2") == vol_model.bytes()
    # The store alone: no cache dir.
    wipe(cache)
    assert read_volume(store, "clone", tmp_path / "r3") == clone_model.bytes()
    assert read_volume(store, "vol", tmp_path / "r4") == vol_model.bytes()
    # And the clone still opens as a writer from the store alone.
    write_and_close(store, "clone", cache, clone_model, [("write", 7, 1, 60)])
    wipe(cache)
    assert read_volume(store, "clone", tmp_path / "r5") == clone_model.bytes()
    assert read_volume(store, "vol", tmp_path / "r6") == vol_model.bytes()


def test_clone_own_segments_start_after_the_parent_seq(cloned, tmp_path):
    store, cache, clone_model, _ = cloned
    parent = load_config(store, "clone").parent
    s1 = read_snapshot(store, load_config(store, "vol"), "s1").seq
    assert parent["volume"] == "vol" and parent["seq"] == s1
    assert parent["volume_id"] == load_config(store, "vol").volume_id
    write_and_close(store, "clone", cache, clone_model, [("write", 9, 1, 70)])
    own = sorted(store_segment_seqs(store, "clone"))
    assert own and own[0] == s1 + 1
    # The parent's segments were not copied.
    assert not set(own) & {s for s in store_segment_seqs(store, "vol") if s <= s1}
