"""Points in time and the plans to restore or diff them.  Pure.

A *point* is a seq: the state after segment `seq` was applied.  `--at TIME`
is the last seq sealed at or before TIME."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Iterable, Iterator

import attrs

from lsbd.errors import PointUnavailable, UserError

BadPoint = PointUnavailable


# --- points in time -----------------------------------------------------------

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: float | None = None) -> float:
    """ISO 8601 ('2026-11-25T10:00', with or without a zone: local time if
    none), 'now', or relative to now ('-15m', '-2h', '-1d', '-30s')."""
    now = time.time() if now is None else now
    t = text.strip()
    if t == "now":
        return now
    m = _RELATIVE.match(t)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"bad time {text!r}: use ISO 8601 (2026-11-25T10:00:00) or a relative "
                        "time like -15m, -2h, -1d") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time
    return dt.timestamp()


def format_time(ns_or_s: float) -> str:
    """Local time, to the second: 2026-11-25 10:00:00."""
    seconds = ns_or_s / 1e9 if ns_or_s > 1e12 else ns_or_s
    return datetime.fromtimestamp(seconds, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def seq_at(times: dict[int, int], when: float, *, created: float, now: float | None = None,
           floor: int = 0) -> int:
    """The last seq sealed at or before `when` (seconds); `floor` (a clone's
    base seq, else 0: the empty volume) when none was.  Pure."""
    now = time.time() if now is None else now
    if when < created:
        raise BadPoint(f"{format_time(when)} is before the volume was created "
                       f"({format_time(created)})")
    if when > now + 1:
        raise BadPoint(f"{format_time(when)} is in the future")
    when_ns = int(when * 1e9)
    best = floor
    for seq, sealed in times.items():
        if sealed <= when_ns and seq > best:
            best = seq
    return best


@attrs.frozen(kw_only=True)
class RestorePlan:
    target: int                 # the seq to reach
    checkpoint: int | None      # the checkpoint to start from (None: from the empty volume)
    segments: list[int]         # segments whose index is read and applied, in order
    index_bytes: int            # about how much metadata the plan reads

    def describe(self) -> list[str]:
        lines = [f"target seq {self.target}"]
        lines.append(f"start from checkpoint {self.checkpoint}" if self.checkpoint
                     else "start from the empty volume (no usable checkpoint)")
        if self.segments:
            lines.append(f"replay {len(self.segments)} segments {self.segments[0]}.."
                         f"{self.segments[-1]}")
        else:
            lines.append("replay no segments")
        return lines


def plan_restore(checkpoints: Iterable[int], segments: dict[int, int], target: int, *,
                 base: int = 0) -> RestorePlan:
    """Which checkpoint and segments rebuild the map at `target`.  Pure.

    `segments` maps seq -> object size; `base` is the first seq a clone owns
    minus one (a clone's earlier history is its parent's)."""
    if target < base:
        raise BadPoint(f"seq {target} is before this volume's history starts")
    usable = [c for c in checkpoints if base <= c <= target]
    start = max(usable) if usable else base
    needed = list(range(start + 1, target + 1))
    missing = [s for s in needed if s not in segments]
    if missing:
        raise BadPoint(f"seq {target} can no longer be rebuilt: segment {missing[0]} was "
                       "reclaimed (outside the retention window, and no snapshot keeps it)")
    # An index is at most a few per cent of its segment; reading the tail costs one GET.
    index_bytes = sum(min(segments[s], 64 * 1024) for s in needed)
    return RestorePlan(target=target, checkpoint=start if usable else None, segments=needed,
                       index_bytes=index_bytes)


def recoverable(checkpoints: Iterable[int], segments: Iterable[int], *, base: int = 0
                ) -> tuple[list[int], int, int]:
    """What history can still be rebuilt.  Pure.

    Returns (isolated points, window start, top): every seq in [window start,
    top] is recoverable (a checkpoint at or before it and every segment after
    it exist), and so is every isolated point (a checkpoint of its own, kept
    for a snapshot or a clone after compaction removed its neighbours)."""
    segs = set(segments)
    anchors = sorted({base} | {c for c in checkpoints if c >= base})
    # Each anchor (a checkpoint, or the base state) reaches forward as long as
    # the segments after it are unbroken.
    runs: list[tuple[int, int]] = []
    for a in anchors:
        end = a
        while end + 1 in segs:
            end += 1
        if runs and a <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((a, end))
    start, top = runs[-1]
    isolated = [s for lo, hi in runs[:-1] for s in range(lo, hi + 1) if s > base or lo > base]
    return isolated, start, top


def changed_ranges(old: Iterable[tuple], new: Iterable[tuple], *,
                   block_size: int) -> Iterator[tuple[int, int]]:
    """Block ranges [start, end) whose content may differ between two maps,
    each given as sorted, non-overlapping (lba, nblocks, seq, offset)
    extents, yielded in block order.  Pure, and lazy: it walks both maps
    once, side by side, holding one extent of each (memory does not grow
    with the maps).

    A block differs when it is mapped in one and not the other, or mapped to
    a different place: a write after the older point always lands in a newer
    segment, so "same place" means "same data"."""
    runs_a = ((lba, lba + n, seq, off) for lba, n, seq, off in old)
    runs_b = ((lba, lba + n, seq, off) for lba, n, seq, off in new)
    a = next(runs_a, None)
    b = next(runs_b, None)
    pos = 0
    pending: tuple[int, int] | None = None
    while True:
        while a is not None and a[1] <= pos:
            a = next(runs_a, None)
        while b is not None and b[1] <= pos:
            b = next(runs_b, None)
        if a is None and b is None:
            break
        # The next place where either map starts or ends a run.
        bounds = [x for r in (a, b) if r is not None for x in r[:2] if x > pos]
        if all(r is None or r[0] > pos for r in (a, b)):
            pos = min(bounds)   # a hole in both
            continue
        end = min(bounds)
        if _place(a, pos, block_size) != _place(b, pos, block_size):
            if pending is not None and pending[1] == pos:
                pending = (pending[0], end)
            else:
                if pending is not None:
                    yield pending
                pending = (pos, end)
        pos = end
    if pending is not None:
        yield pending


def _place(run: tuple | None, block: int, block_size: int) -> tuple[int, int] | None:
    """(seq, file offset) of `block` in a run, None if the run does not cover it."""
    if run is None or not run[0] <= block < run[1]:
        return None
    start, _end, seq, off = run
    return seq, off + (block - start) * block_size
