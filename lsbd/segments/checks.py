"""Checking blocks read from a segment against the CRCs of its index (the
store's or a local copy; docs/durability.md), and blocks read from a
journal against its in-memory index."""

from __future__ import annotations

import array
import logging
import struct

from lsbd.checksum import crc32c, crc32c_of, mask
from lsbd.errors import CorruptionError
from lsbd.format.segment import SegmentIndex, block_crcs, raw_block_crcs

log = logging.getLogger(__name__)


def check_blocks(idx: SegmentIndex, data, offset: int, nblocks: int, bs: int, *,
                 where: str) -> None:
    """nblocks blocks read at `offset` of the segment named `where`:
    CorruptionError naming the first bad one."""
    if len(data) == nblocks * bs:
        if nblocks == 1:   # random reads: compare one number
            try:
                if idx.crc_at(offset) == crc32c_of(data):
                    return
            except KeyError:
                pass      # named below
        else:
            run_crcs = idx.crcs_for(offset, nblocks)
            if run_crcs is not None and array.array("I", raw_block_crcs(data, bs)) == run_crcs:
                return  # the common case: one comparison for the whole run
    if len(data) != nblocks * bs:
        raise CorruptionError(f"{where}: short read at offset {offset}", key=where, offset=offset)
    view = memoryview(data)
    for i in range(nblocks):  # find and name the bad block
        try:
            expected = idx.crc_at(offset + i * bs)
        except KeyError:
            raise CorruptionError(f"{where}: no block at offset {offset + i * bs}",
                                  key=where, offset=offset + i * bs) from None
        if crc32c(view[i * bs:(i + 1) * bs]) != expected:
            log.error("checksum mismatch in segment %s at offset %d", where, offset + i * bs)
            raise CorruptionError(f"{where}: checksum mismatch at offset {offset + i * bs}",
                                  key=where, offset=offset + i * bs)


def check_open_blocks(data: bytes, crcs: list[int], block_size: int, *, where: str,
                      offset: int) -> None:
    """Check blocks read from a journal against the CRCs of its in-memory index."""
    if len(crcs) > 1 and block_crcs(data, block_size) == struct.pack(f"<{len(crcs)}I", *crcs):
        return  # the common case: one comparison for the whole run
    view = memoryview(data)
    for i, expected in enumerate(crcs):  # find and name the bad block
        if mask(crc32c(view[i * block_size:(i + 1) * block_size])) != expected:
            raise CorruptionError(f"{where}: checksum mismatch in the journal",
                                  key=where, offset=offset + i * block_size)


