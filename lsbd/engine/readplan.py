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

from lsbd.engine.journal import HOLE, OpenSegment


def plan_reads(extents, first: int, n: int, sealing: list[OpenSegment],
               open_segment: OpenSegment | None, bs: int) -> list[tuple]:
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


def overlay(runs: list[tuple], seg: OpenSegment, first: int, n: int, bs: int) -> list[tuple]:
    """`runs` with the blocks that journal `seg` holds for [first, first+n)."""
    if seg.holes:   # older than any block entry they contain: applied first
        runs = cut_holes(runs, seg.holes, bs)
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


def cut_holes(runs: list[tuple], holes: list[tuple[int, int]], bs: int) -> list[tuple]:
    """Runs with the block ranges of `holes` turned into holes."""
    out: list[tuple] = []
    for lba, n, source, off, crcs in runs:
        pieces = [(lba, lba + n)]
        if source is not None:
            for h0, h1 in holes:
                next_pieces = []
                for p0, p1 in pieces:
                    if h1 <= p0 or h0 >= p1:
                        next_pieces.append((p0, p1))
                        continue
                    if p0 < h0:
                        next_pieces.append((p0, h0))
                    if h1 < p1:
                        next_pieces.append((h1, p1))
                pieces = next_pieces
        pos = lba
        for p0, p1 in pieces:
            if p0 > pos:
                out.append((pos, p0 - pos, None, 0, None))
            if source is None:
                out.append((p0, p1 - p0, None, 0, None))
            else:
                out.append((p0, p1 - p0, source, off + (p0 - lba) * bs,
                            None if crcs is None else crcs[p0 - lba:p1 - lba]))
            pos = p1
        if pos < lba + n:
            out.append((pos, lba + n - pos, None, 0, None))
    return out


def append_run(runs: list[tuple], piece: tuple, bs: int) -> None:
    """Add a one-block piece, merging it into the previous run when contiguous."""
    lba, n, source, off, crcs = piece
    if runs:
        plba, pn, psrc, poff, pcrcs = runs[-1]
        if psrc == source and plba + pn == lba and (
                source is None or (poff + pn * bs == off and (pcrcs is None) == (crcs is None))):
            runs[-1] = (plba, pn + n, psrc, poff, (pcrcs + crcs) if pcrcs is not None else None)
            return
    runs.append(piece)

