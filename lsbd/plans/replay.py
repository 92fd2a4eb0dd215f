"""Which segments a volume replays on top of a checkpoint, and which are
orphans (prefix consistency: docs/durability.md).  Pure."""

from __future__ import annotations

from typing import Iterable

import attrs


@attrs.frozen(kw_only=True)
class ReplayPlan:
    base: int                 # the checkpoint seq the map starts from (0: empty map)
    replay: list[int]         # segments to apply, in order
    orphans: list[int]        # segments after the first gap: never applied

    @property
    def top(self) -> int:
        return self.replay[-1] if self.replay else self.base


def plan_replay(segment_seqs: Iterable[int], base: int, *, upto: int | None = None) -> ReplayPlan:
    """Which segments to apply on top of checkpoint `base`: the unbroken run
    base+1, base+2, ... (stopping at `upto`); anything after the first gap is
    an orphan (prefix consistency: docs/durability.md)."""
    seqs = sorted(s for s in set(segment_seqs) if s > base)
    replay = []
    expect = base + 1
    for s in seqs:
        if upto is not None and s > upto:
            break
        if s != expect:
            break
        replay.append(s)
        expect += 1
    # A reader that stops early (upto) leaves later segments alone: no orphans.
    orphans = [] if upto is not None else [s for s in seqs if s >= expect]
    return ReplayPlan(base=base, replay=replay, orphans=orphans)
