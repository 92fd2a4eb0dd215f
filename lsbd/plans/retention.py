"""What must be kept, as pure functions: the retention window, the points
that pin history, which segments to rewrite, which objects to delete.

Points that pin history:
  * the live state;
  * every snapshot and every clone's base seq (each has a checkpoint at
    exactly its seq, so it never needs a replay);
  * the retention window: every point after W, the last seq sealed at or
    before now - retain.  The window is kept as a checkpoint at W plus every
    segment after W.

A segment at or before W is needed only while the map at one of those
points refers to it (safe reclamation: docs/history.md)."""

from __future__ import annotations

from typing import Iterable

import attrs


def window_start(sealed_ns: dict[int, int], *, now_ns: int, retain_seconds: float,
                 top: int) -> int:
    """W: the newest seq sealed at or before now - retain (top when retain is 0)."""
    if retain_seconds <= 0:
        return top
    horizon = now_ns - int(retain_seconds * 1e9)
    return max([s for s, t in sealed_ns.items() if t <= horizon and s <= top] or [0])


@attrs.frozen(kw_only=True)
class CompactionPlan:
    window: int                   # W
    victims: list[int]            # segments to rewrite (their live data moves forward)
    live_bytes: dict              # victim -> bytes still live in it
    skipped_pinned: int           # sparse segments kept whole because a snapshot/clone needs them

    @property
    def rewrite_bytes(self) -> int:
        return sum(self.live_bytes.values())


def plan_compaction(*, segments: dict[int, tuple[int, int]], block_size: int, window: int,
                    top: int, base_seq: int, pinned_refs: set[int], threshold: float,
                    force: frozenset[int] = frozenset()) -> CompactionPlan:
    """Choose the segments to rewrite.  Pure.

    segments: seq -> (object size, blocks the live map still uses in it).
    pinned_refs: segments referred to by a snapshot's, a clone's or (when it is
    older than the live state) the window start's checkpoint; those are kept
    whole, so rewriting them would reclaim nothing.
    A segment is a victim when it is at or before W, is this volume's own
    (after base_seq: a clone's older segments belong to its parent), is used
    by the live map, and its live fraction is below `threshold` (or it is
    in `force`: sealed with a data key being retired)."""
    victims = []
    live = {}
    skipped = 0
    for seq in sorted(segments):
        size, live_blocks = segments[seq]
        if seq > window or seq > top or seq <= base_seq or live_blocks == 0 or size <= 0:
            continue
        live_bytes = live_blocks * block_size
        if live_bytes / size >= threshold and seq not in force:
            continue
        if seq in pinned_refs:
            skipped += 1
            continue
        victims.append(seq)
        live[seq] = live_bytes
    return CompactionPlan(window=window, victims=victims, live_bytes=live, skipped_pinned=skipped)


def deletable_segments(stored: Iterable[int], *, window: int, live_checkpoint: int,
                       needed: set[int]) -> list[int]:
    """Segments no point needs any more: at or before W and the newest live
    checkpoint (recovery replays only what follows it), and referred to by
    no kept map.  Pure."""
    limit = min(window, live_checkpoint)
    return sorted(s for s in stored if s <= limit and s not in needed)


def plan_deletions(*, stored: Iterable[int], live_blocks: dict[int, int], window: int,
                   live_checkpoint: int, base_seq: int, kept_refs: set[int]) -> list[int]:
    """The segments a compaction deletes: this volume's own (after base_seq),
    at or before W and the live checkpoint, used by no block of the live map
    (live_blocks: seq -> blocks it still holds) and by no kept point's map
    (kept_refs).  Pure: a dry run calls it with the live blocks the rewrite
    will leave, the real run with those it did leave."""
    stored = list(stored)
    needed = ({s for s, n in live_blocks.items() if n > 0} | {s for s in stored if s > window}
              | kept_refs)
    return deletable_segments([s for s in stored if s > base_seq], window=window,
                              live_checkpoint=live_checkpoint, needed=needed)


def deletable_checkpoints(checkpoints: Iterable[int], *, pinned: set[int], window: int,
                          live_checkpoint: int, keep_recent: int = 2,
                          parents: dict[int, int] | None = None) -> list[int]:
    """Checkpoints nothing needs: not a pinned point, not W, not the newest
    live one, not among the newest `keep_recent` inside the window (they
    shorten replays), and not in the chain (base and earlier deltas) of a
    checkpoint that is kept.  parents: delta seq -> the checkpoint it lies
    over.  Pure."""
    cps = sorted(checkpoints)
    recent = set([c for c in cps if c > window][-keep_recent:])
    # The window's base: W itself, or the newest checkpoint before it.
    base = max([c for c in cps if c <= window] or [0])
    keep = set(pinned) | {window, base, live_checkpoint} | recent
    parents = parents or {}
    for c in list(keep):
        while c in parents:
            c = parents[c]
            keep.add(c)
    return [c for c in cps if c not in keep and c < live_checkpoint]


#: A segment counts as holding dead data when less than this fraction of it is live
#: (the rest of a full segment is its index and headers).
MOSTLY_LIVE = 0.95


def held_back(*, stored: dict[int, int], live_blocks: dict[int, int], block_size: int,
              window: int, kept_refs: set[int], deleted: Iterable[int]) -> dict[str, int]:
    """Why the dead data that stays after a compaction stays, in segments and
    bytes: inside the retention window (after W), kept for a snapshot, a
    clone or the window's start (their maps use the segment), or live enough
    to be above the rewrite threshold.  Pure."""
    gone = set(deleted)
    out = {f"held_by_{why}_{unit}": 0 for why in ("window", "points", "threshold")
           for unit in ("segments", "bytes")}
    for seq, size in stored.items():
        if seq in gone or size <= 0:
            continue
        live = live_blocks.get(seq, 0) * block_size
        if live >= size * MOSTLY_LIVE:
            continue
        why = "window" if seq > window else "points" if seq in kept_refs else "threshold"
        out[f"held_by_{why}_segments"] += 1
        out[f"held_by_{why}_bytes"] += max(0, size - live)
    return out
