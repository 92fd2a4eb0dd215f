"""Read planning: which copy of each block a read returns.

The map says where every block's newest *recorded* copy lives.  Newer copies
may still be in journals the map does not have yet: segments being sealed
(oldest first) and the open segment.  A plan is a list of runs

    (lba, nblocks, source, file offset, crcs)

where source is a segment seq, or None for a hole (reads as zeros), and
crcs is a list of the blocks' masked CRCs when they come from a journal
(the map has no index for it yet), else None.  Pure functions: the caller
holds the volume lock while planning, and reads the data after."""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from typing import Protocol

HOLE = -1  # overlay value of a zeroed/trimmed block


def _range_start(r: tuple) -> int:
    return r[0]


def ranges_meeting(ranges: list[tuple], lo: int, hi: int) -> tuple[int, int]:
    """(i, j): ranges[i:j] are the ranges of an index (sorted, not
    overlapping) that meet blocks [lo, hi)."""
    i = bisect.bisect_right(ranges, lo, key=_range_start)
    if i and ranges[i - 1][1] > lo:
        i -= 1                      # the range before reaches into [lo, hi)
    j = i
    while j < len(ranges) and ranges[j][0] < hi:
        j += 1
    return i, j


class JournalIndex(Protocol):
    """What planning needs of a journal (segments.journal.OpenSegment)."""
    seq: int
    blocks: dict[int, tuple[int, int]]        # lba -> (file offset or HOLE, masked crc)
    ranges: list[tuple[int, int, int, bytes]]  # (start, end, file offset or HOLE, packed crcs)


def plan_reads(extents, first: int, n: int, sealing: Sequence[JournalIndex],
               open_segment: JournalIndex | None, bs: int) -> list[tuple]:
    """The runs covering [first, first+n): the map's extents (clipped to the
    range, in order), with the journals' newer blocks laid over them."""
    runs: list[tuple] = []
    pos = first
    for e in extents:
        if e.lba > pos:
            runs.append((pos, e.lba - pos, None, 0, None))
        runs.append((e.lba, e.nblocks, e.seq, e.offset, None))
        pos = e.lba + e.nblocks
    if pos < first + n:
        runs.append((pos, first + n - pos, None, 0, None))
    for seg in sealing:                 # oldest first: newer copies win
        runs = overlay(runs, seg, first, n, bs)
    if open_segment is not None:
        runs = overlay(runs, open_segment, first, n, bs)
    return runs


def overlay(runs: list[tuple], seg: JournalIndex, first: int, n: int, bs: int) -> list[tuple]:
    """`runs` with the blocks that journal `seg` holds for [first, first+n)."""
    if seg.ranges:   # older than any block entry they contain: applied first
        i, j = ranges_meeting(seg.ranges, first, first + n)
        runs = lay_ranges(runs, seg.ranges[i:j], seg.seq, bs)
    blocks = seg.blocks
    if not blocks:
        return runs
    if n <= len(blocks):
        hit = any(b in blocks for b in range(first, first + n))
    else:
        hit = any(first <= b < first + n for b in blocks)
    if not hit:
        return runs
    # Some blocks are newer in this journal: resolve block by block.
    out: list[tuple] = []
    for lba, count, source, off, crcs in runs:
        for i in range(count):
            b = lba + i
            o = blocks.get(b)
            if o is None:
                piece = (b, 1, source, off + i * bs if source is not None else 0,
                         None if crcs is None else [crcs[i]])
            elif o[0] == HOLE:
                piece = (b, 1, None, 0, None)
            else:
                piece = (b, 1, seg.seq, o[0], [o[1]])
            append_run(out, piece, bs)
    return out


def lay_ranges(runs: list[tuple], ranges: list[tuple], seq: int, bs: int) -> list[tuple]:
    """Runs with the blocks of `ranges` (sorted, not overlapping; from
    journal `seq`) laid over them."""
    if not ranges:
        return runs
    out: list[tuple] = []
    k = 0
    for lba, n, source, off, crcs in runs:
        pos, end = lba, lba + n
        while pos < end:
            while k < len(ranges) and ranges[k][1] <= pos:
                k += 1
            r = ranges[k] if k < len(ranges) and ranges[k][0] < end else None
            upto = end if r is None else max(pos, r[0])
            if r is None or upto > pos:              # the run's own blocks before the next range
                i = pos - lba
                out.append((pos, upto - pos, source, off + i * bs if source is not None else 0,
                            None if crcs is None else crcs[i:i + upto - pos]))
                pos = upto
                continue
            stop = min(end, r[1])
            piece: tuple
            if r[2] == HOLE:
                piece = (pos, stop - pos, None, 0, None)
            else:
                k0 = pos - r[0]
                piece = (pos, stop - pos, seq, r[2] + k0 * bs,
                         list(struct.unpack_from(f"<{stop - pos}I", r[3], 4 * k0)))
            append_run(out, piece, bs)   # one run, though the runs under it were cut
            pos = stop
    return out


def append_run(runs: list[tuple], piece: tuple, bs: int) -> None:
    """Add a piece, merging it into the previous run when contiguous."""
    lba, n, source, off, crcs = piece
    if runs:
        plba, pn, psrc, poff, pcrcs = runs[-1]
        if psrc == source and plba + pn == lba and (
                source is None or (poff + pn * bs == off and (pcrcs is None) == (crcs is None))):
            runs[-1] = (plba, pn + n, psrc, poff, (pcrcs + crcs) if pcrcs is not None else None)
            return
    runs.append(piece)

