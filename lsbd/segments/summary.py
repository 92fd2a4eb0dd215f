"""The map summary: one object a writer's clean close writes, holding what
opening the volume on a new cache dir would otherwise read with one GET per
segment after the last checkpoint: each segment's trailer and index, and for
a compressed or encrypted volume its object's frame index.

    volumes/<volume>/summary

It is a hint, never the truth.  The store's listing decides which segments
exist; an entry is used only for a segment the listing shows with the size
and ETag it had when the summary was written (an object written again
under its seq, as after a writer that lost its lease, has another ETag), so
a segment newer than the summary, or written again since, is read from the
store as before.  An entry is checked as a GET of the segment's tail is (its
trailer's and index's checksums, its seq; the engine then checks the
volume and the chain); one that fails is read from the store.  A summary
that does not decode is ignored, with a warning.  A compressed or encrypted
volume's summary is sealed like its checkpoints (lsbd.names.sealed_volume).

Layout (integers little endian):

    magic "LSBDSUM1" | volume id (16 bytes) | u32 entry count
    per entry: u64 seq | u64 stored size | u16 etag length | u32 index length
               | u32 layout length | etag | trailer | index | layout
    u32 masked CRC32C of everything before
"""

from __future__ import annotations

import logging
import struct

import attrs

from lsbd import names
from lsbd.checksum import masked_crc
from lsbd.errors import CorruptionError, ObjectNotFound, StoreError
from lsbd.format.segment import TRAILER, Record, Trailer, decode_footer, decode_trailer
from lsbd.store import ObjectInfo, Store

log = logging.getLogger(__name__)

MAGIC = b"LSBDSUM1"
_HEAD = struct.Struct("<8s16sI")
_ENTRY = struct.Struct("<QQHII")
_CRC = struct.Struct("<I")


@attrs.frozen
class Entry:
    seq: int
    stored_size: int      # the object's size in the store
    etag: str             # the store's tag of the object (ObjectInfo.etag)
    trailer: bytes        # the segment's trailer, as stored
    index: bytes          # its index (footer), as stored
    layout: bytes = b""   # a sealed object's frame index and tail (lsbd.crypto.objects)

    def decoded(self, where: str) -> tuple[Trailer, list[Record]]:
        """The trailer and records, checked as a GET of the segment's tail
        is (CorruptionError if they do not check)."""
        trailer = decode_trailer(self.trailer, where=where)
        if trailer.seq != self.seq:
            raise CorruptionError(f"{where}: summary entry names seq {trailer.seq}", key=where)
        if not self.layout and (trailer.footer_offset + trailer.footer_length + TRAILER.size
                                != self.stored_size):
            raise CorruptionError(f"{where}: summary entry does not match the object's size",
                                  key=where)
        return trailer, decode_footer(self.index, trailer, where=where)


def encode(volume_id: bytes, entries: list[Entry]) -> bytes:
    parts = [_HEAD.pack(MAGIC, volume_id, len(entries))]
    for e in entries:
        etag = e.etag.encode()
        parts += [_ENTRY.pack(e.seq, e.stored_size, len(etag), len(e.index), len(e.layout)),
                  etag, e.trailer, e.index, e.layout]
    body = b"".join(parts)
    return body + _CRC.pack(masked_crc(body))


def decode(buf: bytes, volume_id: bytes, *, where: str) -> list[Entry]:
    """The entries of a summary (CorruptionError if it is damaged, cut
    short, or of another volume)."""
    if len(buf) < _HEAD.size + _CRC.size or buf[:len(MAGIC)] != MAGIC:
        raise CorruptionError(f"{where}: not a map summary", key=where)
    body = memoryview(buf)[:-_CRC.size]
    if masked_crc(body) != _CRC.unpack_from(buf, len(body))[0]:
        raise CorruptionError(f"{where}: summary checksum mismatch", key=where)
    _magic, vid, count = _HEAD.unpack_from(body)
    if vid != volume_id:
        raise CorruptionError(f"{where}: summary of another volume", key=where)
    out, pos = [], _HEAD.size
    try:
        for _ in range(count):
            seq, stored, etag_len, index_len, layout_len = _ENTRY.unpack_from(body, pos)
            pos += _ENTRY.size
            cuts = [etag_len, TRAILER.size, index_len, layout_len]
            fields = []
            for n in cuts:
                if pos + n > len(body):
                    raise struct.error("cut short")
                fields.append(bytes(body[pos:pos + n]))
                pos += n
            out.append(Entry(seq, stored, fields[0].decode(), fields[1], fields[2], fields[3]))
    except (struct.error, UnicodeDecodeError) as e:
        raise CorruptionError(f"{where}: summary does not parse ({e})", key=where) from e
    if pos != len(body):
        raise CorruptionError(f"{where}: summary length mismatch", key=where)
    return out


def usable(entries: list[Entry], listing: dict[int, ObjectInfo]) -> dict[int, Entry]:
    """seq -> entry, for the entries whose segment the listing shows as the
    very object they were taken from (same size, same non-empty ETag)."""
    out = {}
    for e in entries:
        info = listing.get(e.seq)
        if info is not None and e.etag and info.etag == e.etag and info.size == e.stored_size:
            out[e.seq] = e
    return out


def read(store: Store, volume: str, volume_id: bytes) -> list[Entry]:
    """The volume's summary entries; none if it has no summary, or one that
    cannot be read or does not decode (then with a warning: the segments'
    own indexes are read instead)."""
    key = names.summary_key(volume)
    try:
        return decode(store.get(key), volume_id, where=key)
    except ObjectNotFound:
        return []
    except (CorruptionError, StoreError) as e:
        log.warning("volume %s: map summary not used (%s); reading each segment's index",
                    volume, e)
        return []


def write(store: Store, volume: str, volume_id: bytes, entries: list[Entry]) -> None:
    store.put(names.summary_key(volume), encode(volume_id, entries))
