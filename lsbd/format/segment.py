"""The segment format: one file in the cache dir while it is being written
(the journal), the same bytes as an immutable object once sealed.

    header | record | record | ... | footer (index) | trailer

Records are appended as writes commit; sealing appends the footer (a copy of
every record header, without the data) and a fixed-size trailer that points
at it, so a reader of the store needs only the object's tail to know what the
segment holds.  docs/format.md has the byte tables; integers are little
endian, every stored CRC is a masked CRC32C (lsbd.checksum).
"""

from __future__ import annotations

import array
import bisect
import os
import struct
from typing import Iterator, NamedTuple

import attrs

from lsbd import numpyload
from lsbd.checksum import MASK_DELTA, crc32c, crc32c_of, mask, masked_crc, unmask
from lsbd.errors import CorruptionError

FORMAT_VERSION = 1

HEADER = struct.Struct("<8sHHI16sQqQII")  # magic ver hlen bsize volid seq created_ns reserved reserved crc
HEADER_MAGIC = b"LSBDSEG1"
assert HEADER.size == 64

RECORD = struct.Struct("<4sBBHQII")  # magic kind flags reserved lba nblocks crc
RECORD_MAGIC = b"LREC"
_RECORD_HEAD = struct.Struct("<4sBBHQI")  # RECORD without its crc field
_U32 = struct.Struct("<I")
assert RECORD.size == 24

INDEX_ENTRY = struct.Struct("<BBHIQQ")  # kind flags reserved nblocks lba data_offset
assert INDEX_ENTRY.size == 24

# magic volid seq footer_off footer_len count sealed_ns size prev_crc reserved footer_crc crc
TRAILER = struct.Struct("<8s16sQQIIqQIIII")
_CRC = struct.Struct("<I")
_LANE = struct.Struct("<Q")
TRAILER_MAGIC = b"LSBDEND1"
assert TRAILER.size == 80

# Record kinds.  Values written to disk are never reused.
DATA = 1      # nblocks blocks of data follow
ZERO = 2      # the range reads as zeros (WRITE_ZEROES, or all-zero data)
TRIM = 3      # the range is discarded (reads as zeros)
RESIZE = 4    # lba holds the volume's new size in bytes

FLAG_COMMIT = 0x01  # the last record of a transaction


class Record(NamedTuple):
    kind: int
    flags: int
    lba: int
    nblocks: int
    data_offset: int  # file offset of the first data block (DATA), else 0
    crcs: bytes       # 4 * nblocks masked CRCs (DATA), else b""


def encode_header(volume_id: bytes, seq: int, block_size: int, created_ns: int) -> bytes:
    body = HEADER.pack(HEADER_MAGIC, FORMAT_VERSION, HEADER.size, block_size, volume_id,
                       seq, created_ns, 0, 0, 0)
    return body[:-4] + struct.pack("<I", masked_crc(body[:-4]))


@attrs.frozen(kw_only=True)
class SegmentHeader:
    volume_id: bytes
    seq: int
    block_size: int
    created_ns: int


def decode_header(buf: bytes, *, where: str = "segment") -> SegmentHeader:
    if len(buf) < HEADER.size:
        raise CorruptionError(f"{where}: short header", key=where, offset=0)
    (magic, version, hlen, bsize, volid, seq, created, _r1, _r2, crc) = HEADER.unpack_from(buf)
    if magic != HEADER_MAGIC:
        raise CorruptionError(f"{where}: not a segment (bad magic)", key=where, offset=0)
    if masked_crc(buf[:HEADER.size - 4]) != crc:
        raise CorruptionError(f"{where}: header checksum mismatch", key=where, offset=0)
    if version != FORMAT_VERSION or hlen != HEADER.size:
        raise CorruptionError(f"{where}: unsupported segment version {version}", key=where, offset=0)
    return SegmentHeader(volume_id=volid, seq=seq, block_size=bsize, created_ns=created)


def block_crcs(data: bytes | memoryview, block_size: int) -> bytes:
    """The masked CRC of every block of `data`, packed."""
    if len(data) == block_size:  # the common case of random I/O, without the loop
        return _CRC.pack(mask(crc32c(data)))
    return pack_masked(raw_block_crcs(data, block_size))


# Per block size, the slices of the first blocks of a buffer, made once:
# slicing with them costs half as much as computing each block's bounds.
_BLOCK_SLICES: dict[int, tuple[slice, ...]] = {}


def raw_block_crcs(data: bytes | memoryview, block_size: int) -> list[int]:
    """The plain (unmasked) CRC32C of every block of `data`."""
    view = memoryview(data)
    n = len(view) // block_size
    slices = _BLOCK_SLICES.get(block_size)
    if slices is None:
        slices = _BLOCK_SLICES[block_size] = tuple(
            slice(i * block_size, (i + 1) * block_size) for i in range(256))
    if n <= len(slices):
        return list(map(crc32c_of, map(view.__getitem__, slices[:n])))
    return list(map(crc32c_of, [view[i:i + block_size]
                                for i in range(0, n * block_size, block_size)]))


# For n CRCs laid out as 64-bit lanes of one integer: n lanes of 0xFFFFFFFF,
# of MASK_DELTA, and of 2**32.  Longer arrays go _CHUNK CRCs at a time, which
# keeps this cache small whatever lengths come by.
_CHUNK = 256
_LANES: dict[int, tuple[int, int, int]] = {}


def _lanes(n: int) -> tuple[int, int, int]:
    lanes = _LANES.get(n)
    if lanes is None:
        ones, mask, carry = (int.from_bytes(_LANE.pack(v) * n, "little")
                             for v in (0xFFFFFFFF, MASK_DELTA, 1 << 32))
        lanes = _LANES[n] = (ones, mask, carry)
    return lanes


def _lanewise(crcs, op) -> array.array:
    """op(x, n, lanes) applied to every chunk of `crcs` laid out as lanes;
    the results, as an array("I")."""
    out = array.array("I")
    for i in range(0, len(crcs), _CHUNK):
        chunk = crcs[i:i + _CHUNK]
        n = len(chunk)
        x = op(int.from_bytes(array.array("Q", chunk).tobytes(), "little"), _lanes(n))
        wide = array.array("Q")
        wide.frombytes(x.to_bytes(8 * n, "little"))
        out.extend(array.array("I", wide))
    return out


def _mask_lanes(x: int, lanes: tuple[int, int, int]) -> int:
    low32, delta, _ = lanes
    return ((((x >> 15) | (x << 17)) & low32) + delta) & low32


def _unmask_lanes(x: int, lanes: tuple[int, int, int]) -> int:
    low32, delta, guard = lanes
    # Subtract MASK_DELTA from every lane (adding 2**32 first, so that no
    # lane borrows from the next), then rotate each right by 17.
    x = (x + guard - delta) & low32
    return ((x >> 17) | (x << 15)) & low32


def pack_masked(crcs: list[int]) -> bytes:
    """Mask plain CRCs (checksum.mask) and pack them as "<nI".

    This runs for every block written, so the mask is applied to all of them
    at once: the CRCs are laid out as 64-bit lanes of one big integer, where
    a rotation and an addition of every lane is three shifts, an add and two
    ANDs (a lane's 32 spare bits catch what would cross into the next one)."""
    n = len(crcs)
    if n < 8:
        return struct.pack(f"<{n}I", *map(mask, crcs))
    return _lanewise(crcs, _mask_lanes).tobytes()


def unmask_packed(packed: bytes) -> array.array:
    """The plain CRCs of packed masked ones (checksum.unmask of each), as an
    array("I"): pack_masked's reverse, all at once the same way."""
    masked = array.array("I")
    masked.frombytes(packed)
    if len(masked) < 8:
        return array.array("I", map(unmask, masked))
    return _lanewise(masked, _unmask_lanes)


#: Bytes of a one-block DATA record before its data: the record's header
#: and its one CRC.  Read with the block, they check it with no index.
ONE_BLOCK_HEAD = RECORD.size + 4


def one_block_record_holds(buf, at: int, block_size: int) -> bool:
    """Whether buf[at:] starts with a whole one-block DATA record (its
    header, its CRC, its block) whose header checksum and block CRC hold: a
    block read with the ONE_BLOCK_HEAD bytes before it is then checked
    against the same CRC the segment's index holds for it (the index is a
    copy of every record's header), without the index."""
    end = at + ONE_BLOCK_HEAD + block_size
    if at < 0 or len(buf) < end:
        return False
    view = memoryview(buf)
    magic, kind, _flags, _r, _lba, nblocks, crc = RECORD.unpack_from(view, at)
    if magic != RECORD_MAGIC or kind != DATA or nblocks != 1:
        return False
    crcs = view[at + RECORD.size:at + ONE_BLOCK_HEAD]
    if masked_crc(bytes(view[at:at + RECORD.size - 4]) + bytes(crcs)) != crc:
        return False
    return _U32.unpack(crcs)[0] == mask(crc32c(view[at + ONE_BLOCK_HEAD:end]))


def encode_record(kind: int, flags: int, lba: int, nblocks: int, crcs: bytes = b"") -> bytes:
    """A record's header and CRC array (the data, if any, follows it)."""
    head = _RECORD_HEAD.pack(RECORD_MAGIC, kind, flags, 0, lba, nblocks)
    if crcs:
        return head + _U32.pack(masked_crc(head + crcs)) + crcs
    return head + _U32.pack(masked_crc(head))


@attrs.frozen(kw_only=True)
class Trailer:
    volume_id: bytes
    seq: int
    footer_offset: int
    footer_length: int
    record_count: int
    sealed_ns: int
    volume_size: int
    footer_crc: int
    # The masked CRC of the previous segment's trailer: segments form a chain,
    # so one written by a writer that lost its lease cannot pass for history.
    prev_crc: int = 0


def encode_footer(records: list[Record]) -> bytes:
    parts = []
    for r in records:
        parts.append(INDEX_ENTRY.pack(r.kind, r.flags, 0, r.nblocks, r.lba, r.data_offset))
        parts.append(r.crcs)
    return b"".join(parts)


def encode_trailer(t: Trailer) -> bytes:
    body = TRAILER.pack(TRAILER_MAGIC, t.volume_id, t.seq, t.footer_offset, t.footer_length,
                        t.record_count, t.sealed_ns, t.volume_size, t.prev_crc, 0, t.footer_crc, 0)
    return body[:-4] + struct.pack("<I", masked_crc(body[:-4]))


def decode_trailer(buf: bytes, *, where: str = "segment") -> Trailer:
    if len(buf) < TRAILER.size:
        raise CorruptionError(f"{where}: too short to be a sealed segment", key=where)
    tail = buf[-TRAILER.size:]
    (magic, volid, seq, foff, flen, count, sealed, size, prev, _r, fcrc, crc) = TRAILER.unpack(tail)
    if magic != TRAILER_MAGIC:
        raise CorruptionError(f"{where}: no trailer (not sealed)", key=where)
    if masked_crc(tail[:-4]) != crc:
        raise CorruptionError(f"{where}: trailer checksum mismatch", key=where)
    return Trailer(volume_id=volid, seq=seq, footer_offset=foff, footer_length=flen,
                   record_count=count, sealed_ns=sealed, volume_size=size, footer_crc=fcrc,
                   prev_crc=prev)


def decode_footer(buf: bytes, trailer: Trailer, *, where: str = "segment") -> list[Record]:
    if len(buf) != trailer.footer_length or masked_crc(buf) != trailer.footer_crc:
        raise CorruptionError(f"{where}: index checksum mismatch", key=where,
                              offset=trailer.footer_offset)
    records = []
    pos = 0
    for _ in range(trailer.record_count):
        kind, flags, _r, nblocks, lba, data_offset = INDEX_ENTRY.unpack_from(buf, pos)
        pos += INDEX_ENTRY.size
        ncrc = 4 * nblocks if kind == DATA else 0
        records.append(Record(kind, flags, lba, nblocks, data_offset, buf[pos:pos + ncrc]))
        pos += ncrc
    if pos != len(buf):
        raise CorruptionError(f"{where}: index length mismatch", key=where, offset=trailer.footer_offset)
    return records


def scan_records(f, block_size: int, start: int, *, where: str) -> Iterator[tuple[Record, int]]:
    """Walk the records of an unsealed journal file from `start`, yielding
    (record, end offset) for each record that is whole and whose checksums
    hold; stops quietly at the first torn or invalid one (a crash's tail)."""
    pos = start
    while True:
        f.seek(pos)
        head = f.read(RECORD.size)
        if len(head) < RECORD.size:
            return
        magic, kind, flags, _r, lba, nblocks, crc = RECORD.unpack(head)
        if magic != RECORD_MAGIC or kind not in (DATA, ZERO, TRIM, RESIZE):
            return
        ncrc = 4 * nblocks if kind == DATA else 0
        crcs = f.read(ncrc)
        if len(crcs) < ncrc or masked_crc(head[:-4] + crcs) != crc:
            return
        data_offset = 0
        end = pos + RECORD.size + ncrc
        if kind == DATA:
            data_offset = end
            data = f.read(nblocks * block_size)
            if len(data) < nblocks * block_size or block_crcs(data, block_size) != crcs:
                return
            end += nblocks * block_size
        yield Record(kind, flags, lba, nblocks, data_offset, crcs), end
        pos = end


class SegmentIndex:
    """Where each data block of one segment is, and its CRC: what a reader
    needs to check a block read from any copy of the segment.  The CRCs are
    kept unmasked, as a read computes them: checking a run of blocks is then
    one comparison, with no masking per block."""

    def __init__(self, records: list[Record], block_size: int):
        data = sorted((r for r in records if r.kind == DATA), key=lambda r: r.data_offset)
        # Compact arrays, not objects: many indexes stay cached at once.  A
        # segment of one-block records (random 4 KiB writes) needs no block
        # counts and no CRC positions: 8 bytes a record instead of 20.
        starts = [r.data_offset for r in data]
        self._starts = array.array("I" if not starts or max(starts) < 1 << 32 else "q", starts)
        self._ones = all(r.nblocks == 1 for r in data)
        self._nblocks = array.array("I", () if self._ones else (r.nblocks for r in data))
        crc_starts = array.array("I")
        pos = 0
        for r in data if not self._ones else ():
            crc_starts.append(pos)
            pos += r.nblocks
        self._crc_starts = crc_starts
        self._crcs = unmask_packed(b"".join(r.crcs for r in data))
        self.block_size = block_size

    @classmethod
    def of_one_block_arrays(cls, offsets, crcs, block_size: int) -> SegmentIndex:
        """The index of one-block DATA records from numpy arrays: their data
        offsets in increasing order and their plain CRCs (index_of_footer)."""
        idx = cls.__new__(cls)
        wide = len(offsets) and int(offsets[-1]) >= 1 << 32
        idx._starts = array.array("q" if wide else "I")
        idx._starts.frombytes(offsets.astype("<i8" if wide else "<u4").tobytes())
        idx._ones = True
        idx._nblocks = array.array("I")
        idx._crc_starts = array.array("I")
        idx._crcs = array.array("I")
        idx._crcs.frombytes(crcs.tobytes())
        idx.block_size = block_size
        return idx

    @property
    def nbytes(self) -> int:
        """Memory it holds (what a cache of indexes counts)."""
        return sum(a.itemsize * len(a) for a in (self._starts, self._nblocks,
                                                 self._crc_starts, self._crcs)) + 256

    def crcs_for(self, offset: int, nblocks: int) -> array.array | None:
        """The plain CRCs of nblocks blocks from `offset` when they lie in one
        record (the usual case), else None."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        k, rem = divmod(offset - self._starts[i], self.block_size)
        if rem or k + nblocks > (1 if self._ones else self._nblocks[i]):
            return None
        start = (i if self._ones else self._crc_starts[i]) + k
        return self._crcs[start:start + nblocks]

    def crc_at(self, offset: int) -> int:
        """The plain CRC of the block at `offset` (KeyError: no block starts there)."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            raise KeyError(offset)
        k, rem = divmod(offset - self._starts[i], self.block_size)
        if rem or k >= (1 if self._ones else self._nblocks[i]):
            raise KeyError(offset)
        return self._crcs[(i if self._ones else self._crc_starts[i]) + k]


def read_sealed_index(path: str, *, where: str) -> tuple[Trailer, list[Record]]:
    """Trailer and records of a sealed segment file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_sealed_index_fd(fd, where=where)
    finally:
        os.close(fd)


def read_sealed_index_fd(fd: int, *, where: str) -> tuple[Trailer, list[Record]]:
    return read_sealed_index_from(lambda n, offset: os.pread(fd, n, offset),
                                  os.fstat(fd).st_size, where=where)


def read_sealed_index_from(pread, size: int, *, where: str) -> tuple[Trailer, list[Record]]:
    """Trailer and records of a sealed segment of `size` bytes read with
    pread(length, offset) (a local file in the clear or decrypted)."""
    trailer, footer = read_sealed_footer_from(pread, size, where=where)
    return trailer, decode_footer(footer, trailer, where=where)


def read_sealed_footer_from(pread, size: int, *, where: str) -> tuple[Trailer, bytes]:
    """Trailer and index (undecoded) of a sealed segment, as
    read_sealed_index_from reads them."""
    trailer = decode_trailer(pread(TRAILER.size, max(0, size - TRAILER.size)), where=where)
    if trailer.footer_offset + trailer.footer_length + TRAILER.size != size:
        raise CorruptionError(f"{where}: trailer does not match the file size", key=where)
    return trailer, pread(trailer.footer_length, trailer.footer_offset)


#: One index entry of a one-block DATA record and its CRC, as numpy reads it.
_ONE_BLOCK_ENTRY = [("kind", "u1"), ("flags", "u1"), ("reserved", "<u2"), ("nblocks", "<u4"),
                    ("lba", "<u8"), ("data_offset", "<u8"), ("crc", "<u4")]


def decode_one_block_footer(buf: bytes, trailer: Trailer, *, where: str = "segment"):
    """The lbas and data offsets (numpy arrays, in record order) of an index
    whose records are all one-block DATA records (random 4 KiB writes),
    checked as decode_footer checks it, with no Python object per record;
    None if any record is of another kind or length (decode_footer reads
    those)."""
    entries = _one_block_entries(buf, trailer, where)
    if entries is None:
        return None
    return entries["lba"].copy(), entries["data_offset"].copy()


def _one_block_entries(buf: bytes, trailer: Trailer, where: str):
    """The index entries (a numpy record array) when every record is a
    one-block DATA record, checked as decode_footer checks the index; None
    otherwise."""
    import numpy as np   # on first use: only segments of one-block records need it

    if len(buf) != trailer.footer_length or masked_crc(buf) != trailer.footer_crc:
        raise CorruptionError(f"{where}: index checksum mismatch", key=where,
                              offset=trailer.footer_offset)
    size = INDEX_ENTRY.size + 4
    if len(buf) != trailer.record_count * size:
        return None
    entries = np.frombuffer(buf, np.dtype(_ONE_BLOCK_ENTRY))
    # Read at this stride, every entry one-block DATA means it is the
    # stride the records have: each one ends where the next is read.
    if not (np.all(entries["kind"] == DATA) and np.all(entries["nblocks"] == 1)):
        return None
    return entries


def index_of_footer(buf: bytes, trailer: Trailer, block_size: int, *,
                    where: str = "segment") -> SegmentIndex:
    """The SegmentIndex of a sealed segment's index bytes, checked as
    decode_footer checks them.  An index of one-block records (random
    4 KiB writes) is read with numpy, with no Python object per record:
    0.2 ms for 8,192 records instead of 11-16 ms, and a read after random
    writes over a large volume loads the indexes of hundreds of segments
    for a few blocks each.  Until numpy is loaded (lsbd.numpyload: the first
    read of a cold volume would otherwise wait for its import) every index
    is decoded record by record.  An index whose records are not all one
    block long (its length says so) never asks for numpy: a cold read of
    files written in large pieces decodes each index in 1-3 ms without it,
    and loading it beside that read took 0.5 s of its disk and cores."""
    if len(buf) != trailer.record_count * (INDEX_ENTRY.size + 4):
        return SegmentIndex(decode_footer(buf, trailer, where=where), block_size)
    np = numpyload.loaded()
    if np is None:
        return SegmentIndex(decode_footer(buf, trailer, where=where), block_size)
    entries = _one_block_entries(buf, trailer, where)
    if entries is None:
        return SegmentIndex(decode_footer(buf, trailer, where=where), block_size)
    offsets = entries["data_offset"]
    order = None
    if len(offsets) > 1 and not bool(np.all(offsets[1:] > offsets[:-1])):
        order = np.argsort(offsets, kind="stable")
        offsets = offsets[order]
    rot = entries["crc"] - np.uint32(MASK_DELTA)          # checksum.unmask, on every CRC
    crcs = (rot >> np.uint32(17)) | (rot << np.uint32(15))
    if order is not None:
        crcs = crcs[order]
    return SegmentIndex.of_one_block_arrays(offsets, crcs.astype("<u4"), block_size)
