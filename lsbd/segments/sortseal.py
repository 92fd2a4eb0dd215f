"""A sealed segment of small random writes laid out again in block order.

Random writes reach a journal in the order they arrive, so the blocks of a
range lie scattered over the file, and a sequential read of the range
after random writes reads each block on its own (docs/scale.md).  Written
again with its records sorted by block, a segment gives such a read one
short read in order for every segment it touches.

The footer still lists the records in the order they were written, each
with its data offset; only where the records' bytes lie in the body
changes, and a reader of the footer sees no difference (docs/format.md).
A record overwritten by a later one-block record of the same segment is
left out.  Only segments whose every record is its own transaction (the
COMMIT flag) of at most SORT_MAX_BLOCKS blocks and that overlap nothing
but one block with one block are laid out again: their records then mean
the same in any order, even to a reader that scans the body."""

from __future__ import annotations

import contextlib
import mmap
import os

import attrs

from lsbd import fileio
from lsbd.format.segment import (
    DATA,
    FLAG_COMMIT,
    HEADER,
    TRIM,
    ZERO,
    Record,
    Trailer,
    encode_footer,
    encode_record,
    encode_trailer,
    masked_crc,
)
from lsbd.linux import reserve

#: Records longer than this (blocks) are not small random writes: a segment
#: holding one keeps its layout.
SORT_MAX_BLOCKS = 16
#: Fewer data records than this: too few to be worth a second write.
SORT_MIN_RECORDS = 16
#: Laid out again only when at least one record in this many starts below
#: the one written before it (in order already: nothing to gain).
SORT_DISORDER = 8
_IOV_MAX = 1024
#: The new file is written beside the segment's, then renamed over it; one
#: left by a crash is removed when the cache dir is next opened.
SORT_SUFFIX = ".sort"


def looks_random(records: list[Record]) -> bool:
    """A quick look, while writers wait, at whether a segment may be worth
    sorting: enough records, and the first ones out of order."""
    if len(records) < SORT_MIN_RECORDS:
        return False
    head = records[:4 * SORT_MIN_RECORDS]
    descents = sum(1 for a, b in zip(head, head[1:]) if b.lba < a.lba)
    return descents * SORT_DISORDER >= len(head)


def sort_plan(records: list[Record]) -> list[int] | None:
    """The indexes of the records to keep, in write order, or None when
    the segment keeps its layout (see the module's doc)."""
    owner: dict[int, int] = {}
    dropped: set[int] = set()
    for i, r in enumerate(records):
        if r.kind not in (DATA, ZERO, TRIM) or not r.flags & FLAG_COMMIT \
                or not 1 <= r.nblocks <= SORT_MAX_BLOCKS:
            return None
        for b in range(r.lba, r.lba + r.nblocks):
            j = owner.get(b)
            if j is not None:
                if r.nblocks != 1 or records[j].nblocks != 1:
                    return None
                dropped.add(j)
            owner[b] = i
    keep = [i for i in range(len(records)) if i not in dropped]
    data = [records[i].lba for i in keep if records[i].kind == DATA]
    if len(data) < SORT_MIN_RECORDS:
        return None
    descents = sum(1 for a, b in zip(data, data[1:]) if b < a)
    if descents * SORT_DISORDER < len(data):
        return None
    return keep


def sorted_layout(records: list[Record], keep: list[int],
                 block_size: int) -> tuple[list[Record], list[tuple[int, int, int]], int]:
    """The new layout: the kept records in write order with their new data
    offsets, the body's records in block order as (record index, new
    record start, old data offset), and where the footer starts."""
    pos = HEADER.size
    moved: dict[int, int] = {}
    body: list[tuple[int, int, int]] = []
    for i in sorted(keep, key=lambda k: records[k].lba):
        r = records[i]
        head = 24 + len(r.crcs)
        body.append((i, pos, r.data_offset))
        if r.kind == DATA:
            moved[i] = pos + head
            pos += head + r.nblocks * block_size
        else:
            pos += head
    out = [records[i]._replace(data_offset=moved[i]) if records[i].kind == DATA else records[i]
           for i in keep]
    return out, body, pos


def write_sorted(src_fd: int, dst_path: str, records: list[Record], keep: list[int],
                 trailer: Trailer, block_size: int) -> tuple[Trailer, list[Record], bytes]:
    """Write the segment read from src_fd (a sealed plain local file) laid
    out again at dst_path, synced; returns its trailer, its records (as
    the footer lists them) and the trailer's bytes."""
    new_records, body, footer_offset = sorted_layout(records, keep, block_size)
    footer = encode_footer(new_records)
    new_trailer = attrs.evolve(trailer, footer_offset=footer_offset, footer_length=len(footer),
                               record_count=len(new_records), footer_crc=masked_crc(footer))
    raw = encode_trailer(new_trailer)
    size = footer_offset + len(footer) + len(raw)
    fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        reserve(fd, size)
        src = mmap.mmap(src_fd, 0, prot=mmap.PROT_READ)
        try:
            at = _copy(fd, memoryview(src), records, body, block_size)
            _write_all(fd, [footer, raw], at)
        finally:
            with contextlib.suppress(BufferError):   # views still held by a failed write
                src.close()
        if at != footer_offset:
            raise AssertionError(f"laid out {at} bytes of body, not {footer_offset}")
        fileio.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(dst_path)
        raise
    os.close(fd)
    return new_trailer, new_records, raw


def _copy(fd: int, view: memoryview, records: list[Record], body: list[tuple[int, int, int]],
          block_size: int) -> int:
    """Write the header and the records in body order; returns where the
    body ends."""
    iov: list = [view[:HEADER.size]]
    at = 0        # where iov starts in the new file
    queued = HEADER.size
    for i, _start, old in body:
        r = records[i]
        iov.append(encode_record(r.kind, r.flags, r.lba, r.nblocks, r.crcs))
        queued += len(iov[-1])
        if r.kind == DATA:
            n = r.nblocks * block_size
            iov.append(view[old:old + n])
            queued += n
        if len(iov) >= _IOV_MAX - 1:
            _write_all(fd, iov, at)
            at += queued
            iov, queued = [], 0
    _write_all(fd, iov, at)
    return at + queued


def _write_all(fd: int, iov: list, offset: int) -> None:
    want = sum(len(b) for b in iov)
    n = os.pwritev(fd, iov, offset)
    if n != want:
        raise OSError(28, "short write laying out a segment again (disk full?)")


def sorted_blocks(blocks: dict[int, tuple[int, int]], old: list[Record],
                  new: list[Record], keep: list[int],
                  block_size: int) -> dict[int, tuple[int, int]]:
    """A sealed journal's in-memory index (lba -> (offset, crc)) with the
    new offsets of its data blocks."""
    out = dict(blocks)
    for r_new, i in zip(new, keep):
        if r_new.kind != DATA:
            continue
        delta = r_new.data_offset - old[i].data_offset
        for j in range(r_new.nblocks):
            where = out.get(r_new.lba + j)
            if where is None or where[0] != old[i].data_offset + j * block_size:
                raise ValueError(f"block {r_new.lba + j} is not where its record says")
            out[r_new.lba + j] = (where[0] + delta, where[1])
    return out
