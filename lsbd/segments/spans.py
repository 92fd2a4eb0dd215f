"""Reading many pieces of one local segment file at once: pieces that lie
close together become one span (one pread), and spans of a cold file are
handed to the kernel together so that the disk works on all of them at
once.  Pure helpers for SegmentFiles.read_batch."""

from __future__ import annotations

import contextlib
import os
from operator import itemgetter, sub
from typing import Callable

from lsbd import linux
from lsbd.checksum import crc32c_of

#: Pieces of one segment this close in its file (bytes between them) are
#: read with one pread: in the page cache a call costs as much as copying
#: some 16 KiB, and on the disk the gap is in the same or the next pages.
SPAN_GAP = 16 * 1024
#: A span stops growing at this size.
SPAN_MAX = 1 << 20

Span = tuple[int, int, list]
Bytes = bytes | bytearray | memoryview   # (start, end, the pieces (file offset, nblocks) in it)


def coalesce(pieces: list[tuple[int, int]], block_size: int) -> list[Span]:
    """Pieces (file offset, nblocks) as spans to read, in file order."""
    spans: list[Span] = []
    for off, n in sorted(pieces):
        end = off + n * block_size
        if spans:
            start, prev_end, members = spans[-1]
            if off - prev_end <= SPAN_GAP and end - start <= SPAN_MAX:
                members.append((off, n))
                if end > prev_end:
                    spans[-1] = (start, end, members)
                continue
        spans.append((off, end, [(off, n)]))
    return spans


def apart(pieces: list[tuple[int, int]], block_size: int) -> list[int] | None:
    """The file offsets of the pieces (file offset, nblocks), in order, when
    each is one block and no two are near enough to share a span (each
    would be a span of its own: a pread each, read_apart); None
    otherwise.  Found by C loops: a read after random writes finds some
    five blocks far apart in each of some 30 files a MiB."""
    if sum(map(itemgetter(1), pieces)) != len(pieces):    # a piece of more than one block
        return None
    offsets = sorted(map(itemgetter(0), pieces))
    if len(offsets) > 1 and min(map(sub, offsets[1:], offsets)) <= SPAN_GAP + block_size:
        return None
    return offsets


def will_need(fd: int, spans: list[Span], base: int = 0) -> None:
    """Have the kernel start reading these spans now, asynchronously (base:
    where the segment's offset 0 is in the file)."""
    for start, end, _members in spans:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, base + start, end - start, os.POSIX_FADV_WILLNEED)


def will_need_whole(fd: int) -> None:
    """Have the kernel start reading a whole file now, asynchronously (a
    piece at a time: lsbd.linux.will_need)."""
    with contextlib.suppress(OSError):
        linux.will_need(fd, 0, os.fstat(fd).st_size)


def split_span(data, start: int, members: list, block_size: int,
               crc_at: Callable[[int], int],
               check: Callable[[int, Bytes, int], None]) -> list[tuple[int, Bytes]]:
    """The pieces of a span read from `start`: [(file offset, its bytes)],
    each checked.  A one-block piece is compared with crc_at(offset) here;
    anything else goes to check(offset, bytes, nblocks), which raises on a
    bad block and names it."""
    if len(members) == 1 and members[0][0] == start:
        off, n = members[0]
        try:   # a random write's block: one comparison, no call of check's layers
            good = n == 1 and len(data) == block_size and crc_at(off) == crc32c_of(data)
        except KeyError:
            good = False
        if not good:
            check(off, data, n)
        return [(off, data)]
    view = memoryview(data)
    out: list[tuple[int, Bytes]] = []
    for off, n in members:
        piece = view[off - start:off - start + n * block_size]
        try:
            good = n == 1 and len(piece) == block_size and crc_at(off) == crc32c_of(piece)
        except KeyError:
            good = False
        if not good:
            check(off, piece, n)
        out.append((off, piece))
    return out
