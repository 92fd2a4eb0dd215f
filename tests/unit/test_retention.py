"""The pure planning functions behind compaction and history: the retention
window, which segments to rewrite, which segments and checkpoints may be
deleted (lsbd.plans.retention), and which points can still be rebuilt
(lsbd.plans.restore.recoverable)."""

from __future__ import annotations

import random

import pytest

from lsbd.plans.restore import BadPoint, plan_restore, recoverable
from lsbd.plans.retention import (
    CompactionPlan,
    deletable_checkpoints,
    deletable_segments,
    plan_compaction,
    window_start,
)

S = 1_000_000_000  # one second in ns
BS = 4096


# --- window_start ---------------------------------------------------------------------

def test_window_retain_zero_is_top():
    sealed = {1: 10 * S, 2: 20 * S, 3: 30 * S}
    assert window_start(sealed, now_ns=31 * S, retain_seconds=0, top=3) == 3
    # Whatever the times are, and even with no segment at all.
    assert window_start({}, now_ns=0, retain_seconds=0, top=7) == 7
    assert window_start(sealed, now_ns=31 * S, retain_seconds=-5, top=3) == 3


def test_window_is_newest_seq_sealed_before_the_horizon():
    sealed = {1: 10 * S, 2: 20 * S, 3: 30 * S, 4: 40 * S}
    # horizon = 45 - 20 = 25: seqs 1 and 2 are old enough.
    assert window_start(sealed, now_ns=45 * S, retain_seconds=20, top=4) == 2
    # Sealed exactly at the horizon counts as old enough.
    assert window_start(sealed, now_ns=50 * S, retain_seconds=20, top=4) == 3
    # Fractional retention.
    assert window_start(sealed, now_ns=30 * S + S // 2, retain_seconds=0.5, top=4) == 3


def test_window_nothing_old_enough_is_zero():
    sealed = {1: 10 * S, 2: 20 * S}
    assert window_start(sealed, now_ns=21 * S, retain_seconds=60, top=2) == 0
    assert window_start({}, now_ns=21 * S, retain_seconds=60, top=0) == 0


def test_window_never_passes_top():
    sealed = {1: 10 * S, 2: 20 * S, 3: 30 * S}
    assert window_start(sealed, now_ns=1000 * S, retain_seconds=1, top=2) == 2
    assert window_start(sealed, now_ns=1000 * S, retain_seconds=1, top=0) == 0


def test_window_everything_old():
    sealed = {s: s * S for s in range(1, 50)}
    assert window_start(sealed, now_ns=10_000 * S, retain_seconds=3600, top=49) == 49


# --- plan_compaction ------------------------------------------------------------------

def _plan(segments, *, window=100, top=100, base_seq=0, pinned=(), threshold=0.6):
    return plan_compaction(segments=segments, block_size=BS, window=window, top=top,
                           base_seq=base_seq, pinned_refs=set(pinned), threshold=threshold)


def test_plan_picks_sparse_segments_only():
    segments = {
        1: (100 * BS, 10),    # 10% live: victim
        2: (100 * BS, 59),    # 59% live: victim at 0.6
        3: (100 * BS, 60),    # exactly the threshold: kept
        4: (100 * BS, 100),   # full: kept
        5: (100 * BS, 0),     # dead: deleted, never rewritten
    }
    plan = _plan(segments)
    assert isinstance(plan, CompactionPlan)
    assert plan.victims == [1, 2]
    assert plan.live_bytes == {1: 10 * BS, 2: 59 * BS}
    assert plan.rewrite_bytes == 69 * BS
    assert plan.skipped_pinned == 0
    assert plan.window == 100


def test_plan_threshold_one_takes_every_used_segment():
    # A full segment still has its header, so even it is "below 1.0".
    segments = {1: (100 * BS + 300, 100), 2: (50 * BS + 300, 1), 3: (10 * BS, 0)}
    assert _plan(segments, threshold=1.0).victims == [1, 2]


def test_plan_threshold_zero_takes_nothing():
    segments = {1: (100 * BS, 1), 2: (100 * BS, 50)}
    assert _plan(segments, threshold=0.0).victims == []


def test_plan_respects_window_and_top():
    segments = {s: (100 * BS, 1) for s in range(1, 11)}
    assert _plan(segments, window=4, top=10).victims == [1, 2, 3, 4]
    # Nothing is old enough: nothing to rewrite.
    assert _plan(segments, window=0, top=10).victims == []
    # Segments after top (not yet applied) are never touched.
    assert _plan(segments, window=10, top=6).victims == [1, 2, 3, 4, 5, 6]


def test_plan_retain_zero_window_is_top():
    segments = {s: (100 * BS, 5) for s in range(1, 6)}
    window = window_start({s: s * S for s in segments}, now_ns=6 * S, retain_seconds=0, top=5)
    assert _plan(segments, window=window, top=5).victims == [1, 2, 3, 4, 5]


def test_plan_pinned_segments_are_kept_whole():
    segments = {1: (100 * BS, 10), 2: (100 * BS, 10), 3: (100 * BS, 90), 4: (100 * BS, 0)}
    plan = _plan(segments, pinned={1, 3, 4})
    assert plan.victims == [2]
    # Only the ones that would have been rewritten count as skipped.
    assert plan.skipped_pinned == 1
    assert plan.live_bytes == {2: 10 * BS}


def test_plan_clone_never_rewrites_its_parents_segments():
    segments = {s: (100 * BS, 10) for s in range(1, 11)}
    plan = _plan(segments, base_seq=6)
    assert plan.victims == [7, 8, 9, 10]
    # base_seq itself is the parent's.
    assert 6 not in _plan(segments, base_seq=6, threshold=1.0).victims


def test_plan_ignores_empty_objects():
    assert _plan({1: (0, 3), 2: (-1, 3)}).victims == []


def test_plan_empty():
    plan = _plan({})
    assert plan.victims == [] and plan.rewrite_bytes == 0 and plan.skipped_pinned == 0


def test_plan_random_matches_a_direct_rule():
    rng = random.Random(7)
    for _ in range(200):
        segments = {s: (rng.randint(1, 200) * BS, rng.randint(0, 200)) for s in range(1, 30)}
        window, top = rng.randint(0, 30), rng.randint(0, 30)
        base = rng.randint(0, 10)
        pinned = {rng.randint(1, 30) for _ in range(rng.randint(0, 5))}
        threshold = rng.choice([0.3, 0.6, 1.0])
        plan = _plan(segments, window=window, top=top, base_seq=base, pinned=pinned,
                     threshold=threshold)
        want = [s for s in sorted(segments)
                if base < s <= min(window, top) and segments[s][1] > 0
                and segments[s][1] * BS / segments[s][0] < threshold and s not in pinned]
        assert plan.victims == want
        assert plan.rewrite_bytes == sum(segments[s][1] * BS for s in want)
        assert set(plan.victims).isdisjoint(pinned)


# --- deletable_segments ---------------------------------------------------------------

def test_deletable_segments_basic():
    stored = [1, 2, 3, 4, 5, 6]
    assert deletable_segments(stored, window=6, live_checkpoint=6, needed={2, 5}) == [1, 3, 4, 6]


def test_deletable_segments_never_after_the_live_checkpoint():
    # Recovery replays every segment after the newest checkpoint: they must stay.
    stored = range(1, 11)
    assert deletable_segments(stored, window=10, live_checkpoint=4, needed=set()) == [1, 2, 3, 4]
    assert deletable_segments(stored, window=10, live_checkpoint=0, needed=set()) == []


def test_deletable_segments_never_inside_the_window():
    stored = range(1, 11)
    assert deletable_segments(stored, window=3, live_checkpoint=10, needed=set()) == [1, 2, 3]
    assert deletable_segments(stored, window=0, live_checkpoint=10, needed=set()) == []


def test_deletable_segments_needed_and_unsorted_input():
    assert deletable_segments([9, 3, 7, 1], window=9, live_checkpoint=9,
                              needed={7}) == [1, 3, 9]
    assert deletable_segments([], window=9, live_checkpoint=9, needed=set()) == []
    assert deletable_segments([1, 2], window=9, live_checkpoint=9, needed={1, 2}) == []


# --- deletable_checkpoints ------------------------------------------------------------

def test_deletable_checkpoints_retain_zero():
    # W is the top: no "recent" checkpoints; the live one and pinned ones stay.
    cps = [2, 4, 6, 8, 10]
    assert deletable_checkpoints(cps, pinned={4}, window=10, live_checkpoint=10) == [2, 6, 8]


def test_deletable_checkpoints_keep_window_base_and_recent():
    cps = [2, 4, 6, 8, 10, 12]
    # W = 7: its base is 6 (the newest checkpoint at or before it); the two
    # newest inside the window (10, 12) shorten replays.
    got = deletable_checkpoints(cps, pinned=set(), window=7, live_checkpoint=12)
    assert got == [2, 4, 8]
    got = deletable_checkpoints(cps, pinned=set(), window=7, live_checkpoint=12, keep_recent=3)
    assert got == [2, 4]
    # A checkpoint exactly at W is the base.
    assert deletable_checkpoints(cps, pinned=set(), window=8, live_checkpoint=12) == [2, 4, 6]


def test_deletable_checkpoints_never_the_live_one_or_newer():
    cps = [2, 4, 6, 8]
    got = deletable_checkpoints(cps, pinned=set(), window=8, live_checkpoint=4, keep_recent=0)
    assert got == [2]
    assert 8 not in got and 6 not in got


def test_deletable_checkpoints_nothing_old_enough():
    # W = 0: no base; the recent ones and the live one stay.
    cps = [3, 5, 7, 9]
    assert deletable_checkpoints(cps, pinned=set(), window=0, live_checkpoint=9) == [3, 5]


def test_deletable_checkpoints_pinned_clone_and_snapshot_points():
    cps = [1, 3, 5, 7, 9]
    assert deletable_checkpoints(cps, pinned={1, 5, 9}, window=9, live_checkpoint=9) == [3, 7]
    assert deletable_checkpoints([], pinned={1}, window=9, live_checkpoint=9) == []


def test_deletable_checkpoints_random_properties():
    rng = random.Random(11)
    for _ in range(300):
        cps = sorted(rng.sample(range(1, 60), rng.randint(0, 12)))
        live = rng.choice(cps) if cps else 0
        window = rng.randint(0, 60)
        pinned = set(rng.sample(range(1, 60), rng.randint(0, 4)))
        got = deletable_checkpoints(cps, pinned=pinned, window=window, live_checkpoint=live)
        assert set(got) <= set(cps)
        assert got == sorted(got)
        assert all(c < live for c in got)
        assert not set(got) & pinned
        assert window not in got
        base = max([c for c in cps if c <= window] or [0])
        assert base not in got or base == 0


# --- recoverable ----------------------------------------------------------------------

def test_recoverable_empty_volume():
    assert recoverable([], []) == ([], 0, 0)


def test_recoverable_full_history():
    assert recoverable([5], range(1, 11)) == ([], 0, 10)
    assert recoverable([], range(1, 4)) == ([], 0, 3)


def test_recoverable_after_compaction_with_retain_zero():
    # Segments 7, 9, 10 are live; checkpoint 3 is a snapshot's, 10 the live one.
    isolated, start, top = recoverable([3, 10], [7, 9, 10])
    assert (isolated, start, top) == ([3], 10, 10)
    # Each reported point really can be rebuilt, and the ones between cannot.
    segs = {7: 1, 9: 1, 10: 1}
    for p in [3] + list(range(start, top + 1)):
        plan_restore([3, 10], segs, p)
    for p in (4, 8, 9):
        with pytest.raises(BadPoint):
            plan_restore([3, 10], segs, p)


def test_recoverable_window_starts_at_a_checkpoint():
    assert recoverable([8, 10], [9, 10]) == ([], 8, 10)
    # A gap below the checkpoint: older checkpoints are isolated points.
    assert recoverable([2, 5, 8], [6, 7, 8, 9, 10]) == ([2], 5, 10)


def test_recoverable_window_start_moves_up_to_the_first_checkpoint():
    # Segments 4..10 exist but the only checkpoint is at 6: 4 and 5 cannot be rebuilt.
    assert recoverable([6], range(4, 11)) == ([], 6, 10)


def test_recoverable_no_segments_after_the_live_checkpoint():
    # Everything trimmed: compaction deleted every segment, the checkpoint remains.
    assert recoverable([4, 10], []) == ([4], 10, 10)


def test_recoverable_clone_base():
    # A clone of seq 5 owns 6.. ; its base state is its parent's, always rebuildable.
    assert recoverable([], [6, 7], base=5) == ([], 5, 7)
    # Checkpoints before the base are the parent's business.
    assert recoverable([2, 5], [6, 7], base=5) == ([], 5, 7)
    # A clone whose own early segments were compacted away.
    assert recoverable([9], [8, 9, 10], base=5) == ([], 9, 10)
    # A fresh clone with nothing written.
    assert recoverable([], [], base=5) == ([], 5, 5)


def test_recoverable_agrees_with_plan_restore():
    """On any consistent store (no gap after the newest checkpoint: the writer
    never deletes a segment recovery replays), every point reported can be
    rebuilt, and every rebuildable point above the window start is reported."""
    rng = random.Random(3)
    for _ in range(500):
        base = rng.choice([0, 0, 3])
        top = rng.randint(base, base + 15)
        cps = [c for c in range(base + 1, top + 1) if rng.random() < 0.25]
        live = max(cps or [base])
        segs = {s: 1 for s in range(base + 1, top + 1) if s > live or rng.random() < 0.6}
        isolated, start, got_top = recoverable(cps, segs, base=base)
        assert got_top == top
        assert start <= top
        ok = set(isolated) | set(range(start, got_top + 1))
        for p in range(base, got_top + 1):
            try:
                plan_restore(cps, segs, p, base=base)
                can = True
            except BadPoint:
                can = False
            if p in ok:
                assert can, (p, cps, sorted(segs), base, isolated, start)
            elif can:
                # Conservative only below the window start, where an old
                # checkpoint happens to still have its following segments.
                assert p < start, (p, cps, sorted(segs), base, isolated, start)
        # The live state is always recoverable.
        assert top in ok


def test_recoverable_orphan_after_a_gap_is_not_a_point():
    # Segment 4 never reached the store; 5 did (uploads run in parallel), then a crash.
    # Recovery stops at 3 (DESIGN invariant 3: objects after a gap are orphans).
    checkpoints, segments = [], {1: 1, 2: 1, 3: 1, 5: 1}
    isolated, start, top = recoverable(checkpoints, segments)
    reported = set(isolated) | set(range(start, top + 1))
    for p in sorted(reported):
        plan_restore(checkpoints, segments, p)  # raises BadPoint for 5
    assert {0, 1, 2, 3} <= reported
