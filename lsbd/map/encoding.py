"""The block map's bytes: keys, extent values and segment records (map format 2;
docs/format.md "Cache dir").  Pure encoding, no LMDB: lsbd.map.blockmap stores them."""

from __future__ import annotations

import struct
from typing import NamedTuple

import attrs

SEQ_KEY = struct.Struct(">Q")  # segments database; format 1 extents
WIDE = struct.Struct("<IQQ")     # format 1 extent values; format 2 wide values
SHORT = struct.Struct("<HII")    # format 2 values when all three fit
SHORT_MAX_N = 1 << 16
U32 = 1 << 32
KEY_BYTES = 6
MAP_FORMAT = 2
SEGINFO = struct.Struct("<BqQQQI")

PENDING = 1   # sealed locally, not yet in the store
STORED = 2    # durable in the store


def key_of(lba: int) -> bytes:
    return lba.to_bytes(KEY_BYTES, "big")


def lba_of(key) -> int:
    return int.from_bytes(key, "big")


def value_of(nblocks: int, seq: int, offset: int) -> bytes:
    if nblocks < SHORT_MAX_N and seq < U32 and offset < U32:
        return SHORT.pack(nblocks, seq, offset)
    return WIDE.pack(nblocks, seq, offset)


def unpack_value(value) -> tuple[int, int, int]:
    return SHORT.unpack(value) if len(value) == SHORT.size else WIDE.unpack(value)


class Extent(NamedTuple):
    lba: int
    nblocks: int
    seq: int
    offset: int  # file offset of block `lba` inside segment `seq`


@attrs.define(kw_only=True)
class SegmentInfo:
    seq: int
    state: int
    sealed_ns: int
    size: int          # bytes of the sealed object
    live_blocks: int   # data blocks the map still points at
    data_blocks: int   # data blocks written into it
    trailer_crc: int   # fingerprint: tells our copy from another writer's

    def pack(self) -> bytes:
        return SEGINFO.pack(self.state, self.sealed_ns, self.size, self.live_blocks,
                             self.data_blocks, self.trailer_crc)

    @classmethod
    def unpack(cls, seq: int, raw: bytes) -> "SegmentInfo":
        state, sealed, size, live, data, tcrc = SEGINFO.unpack(raw)
        return cls(seq=seq, state=state, sealed_ns=sealed, size=size, live_blocks=live,
                   data_blocks=data, trailer_crc=tcrc)
