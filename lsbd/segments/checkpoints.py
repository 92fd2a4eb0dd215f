"""Checkpoints: the block map as of a seq, so recovery replays only the
segments after it.

A checkpoint is several immutable objects: parts of at most PART_EXTENTS
entries each (zlib-compressed, CRC-checked), written first, then a small
manifest that lists them.  A checkpoint exists once its manifest does; parts
without a manifest are leftovers of an interrupted checkpoint.  Memory use
is bounded by one part, whatever the size of the map.

A checkpoint is a *base* (every extent of the map) or a *delta*: the map's
extents over every block range that the segments since the previous
checkpoint (`prev`) touched, holes included, so that the map at `prev` with
the delta laid over it is the map at this seq.  A chain is a base and the
deltas after it; a new base is written when the chain is MAX_CHAIN long or
its deltas hold as many entries as the base (choose_kind), so checkpoint
bytes stay a flat fraction of the bytes written."""

from __future__ import annotations

import json
import logging
import struct
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import attrs

from lsbd import names
from lsbd.checksum import masked_crc
from lsbd.map.blockmap import STORED, Extent, SegmentInfo
from lsbd.map.packed import ENTRY, Part, Run
from lsbd.errors import CorruptionError, ObjectExists, ObjectNotFound
from lsbd.store import Store

log = logging.getLogger(__name__)

PART_MAGIC = b"LSBDCKP1"
PART_HEADER = struct.Struct("<8sQBxxxII")  # magic seq kind count crc
PART_EXTENTS_KIND = 1
PART_SEGMENTS_KIND = 2
EXTENT_ENTRY = ENTRY                      # lba nblocks seq offset (<QIQQ)
SEGMENT_ENTRY = struct.Struct("<QqQQ")    # seq sealed_ns size data_blocks
PART_DELTA_KIND = 3                       # entries as extents; seq 0: a hole
#: Entries per part written: 7 MiB of entries in memory at a time.  Parts
#: of up to 2^20 (what earlier versions wrote) are read as well.
PART_EXTENTS = 1 << 18
#: Entries per piece a merge of a chain unpacks its parts in (read_runs).
PIECE_EXTENTS = 1 << 15
#: Compressed bytes inflated at a time when a part is read by pieces.
INFLATE_STEP = 1 << 14
#: Deltas after a base before the next base: bounds what opening applies.
MAX_CHAIN = 8


@attrs.frozen(kw_only=True)
class Manifest:
    volume_id: str
    seq: int
    created_ns: int
    volume_size: int
    block_size: int
    extents: int
    parts: list  # [(key, kind, count, crc)]
    top_crc: int | None = None  # trailer fingerprint of segment `seq`: the chain goes on from it
    format: int = 1
    # A delta (format 2): the checkpoint it lies over, its base, its place in
    # the chain (1 for the first delta) and the entries of the chain's deltas
    # up to it.  A base leaves them out: its manifest is format 1's.
    prev: int | None = None
    base: int | None = None
    chain: int = 0
    delta_entries: int = 0

    @property
    def is_delta(self) -> bool:
        return self.prev is not None

    def to_json(self) -> bytes:
        body = attrs.asdict(self)
        if not self.is_delta:
            for name in ("prev", "base", "chain", "delta_entries"):
                del body[name]
        text = json.dumps(body, sort_keys=True)
        return json.dumps({"manifest": body, "crc": masked_crc(text.encode())}, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> "Manifest":
        try:
            outer = json.loads(raw)
            body = outer["manifest"]
            if masked_crc(json.dumps(body, sort_keys=True).encode()) != outer["crc"]:
                raise ValueError("checksum mismatch")
            return cls(**body)
        except (ValueError, TypeError, KeyError) as e:
            raise CorruptionError(f"{where}: bad checkpoint manifest ({e})", key=where) from e


def _encode_part(seq: int, kind: int, count: int, body: bytes) -> bytes:
    packed = zlib.compress(body, 1)
    return PART_HEADER.pack(PART_MAGIC, seq, kind, count, masked_crc(packed)) + packed


def _decode_part(raw: bytes, *, seq: int, kind: int, where: str) -> bytes:
    return zlib.decompress(_checked_packed(raw, seq=seq, kind=kind, where=where))


def _checked_packed(raw: bytes, *, seq: int, kind: int, where: str) -> memoryview:
    """A part's compressed entries, once its header and CRC check."""
    if len(raw) < PART_HEADER.size:
        raise CorruptionError(f"{where}: short checkpoint part", key=where)
    magic, pseq, pkind, count, crc = PART_HEADER.unpack_from(raw)
    packed = memoryview(raw)[PART_HEADER.size:]
    if magic != PART_MAGIC or pseq != seq or pkind != kind or masked_crc(packed) != crc:
        raise CorruptionError(f"{where}: checkpoint part fails its check", key=where)
    return packed


def choose_kind(prev: Manifest | None, base: Manifest | None) -> bool:
    """Whether the next checkpoint may be a delta over `prev` (whose chain
    starts at `base`).  Pure."""
    if prev is None or base is None:
        return False
    return prev.chain < MAX_CHAIN and prev.delta_entries < max(base.extents, 1 << 16)


def write_checkpoint(store: Store, volume: str, volume_id: str, seq: int, *, volume_size: int,
                     block_size: int, extents: Iterable[tuple | Run],
                     segments: Iterable[SegmentInfo], top_crc: int | None = None,
                     delta_of: Manifest | None = None) -> Manifest:
    """Write a base of `extents`; or, with delta_of (the previous checkpoint),
    a delta whose entries are `extents`: the map over the ranges changed
    since, a hole as an entry of seq 0."""
    try:  # the map at a seq never changes: an existing checkpoint is the same one
        return read_manifest(store, volume, seq)
    except (ObjectNotFound, CorruptionError):
        pass
    parts: list[tuple[str, int, int, int]] = []

    def flush_part(kind: int, count: int, body: bytes | bytearray) -> None:
        key = names.checkpoint_part_key(volume, seq, len(parts))
        data = _encode_part(seq, kind, count, body)
        try:
            store.put(key, data, exclusive=True)
        except ObjectExists:
            store.put(key, data)  # a leftover of an interrupted attempt at this seq
        parts.append((key, kind, count, masked_crc(data)))

    # Entries are packed into one buffer per part (a list of small bytes
    # objects costs twice their size again in memory).
    total = 0
    body = bytearray()
    count = 0
    kind = PART_EXTENTS_KIND if delta_of is None else PART_DELTA_KIND
    pack = EXTENT_ENTRY.pack
    for e in extents:
        if isinstance(e, Run):       # packed already: its bytes as they are
            at = e.start
            while at < e.stop:
                take = min(e.stop - at, PART_EXTENTS - count)
                body += Run(e.part, at, at + take).body()
                count += take
                at += take
                if count >= PART_EXTENTS:
                    flush_part(kind, count, body)
                    total += count
                    body, count = bytearray(), 0
            continue
        body += pack(*e)
        count += 1
        if count >= PART_EXTENTS:
            flush_part(kind, count, body)
            total += count
            body, count = bytearray(), 0
    total += count
    if count or not parts:
        flush_part(kind, count, body)
    body, count = bytearray(), 0
    for s in segments:
        body += SEGMENT_ENTRY.pack(s.seq, s.sealed_ns, s.size, s.data_blocks)
        count += 1
        if count >= PART_EXTENTS:
            flush_part(PART_SEGMENTS_KIND, count, body)
            body, count = bytearray(), 0
    if count or not parts or parts[-1][1] != PART_SEGMENTS_KIND:
        flush_part(PART_SEGMENTS_KIND, count, body)
    chain: dict = {}
    if delta_of is not None:
        chain = {"format": 2, "prev": delta_of.seq,
                 "base": delta_of.base if delta_of.is_delta else delta_of.seq,
                 "chain": delta_of.chain + 1, "delta_entries": delta_of.delta_entries + total}
    manifest = Manifest(volume_id=volume_id, seq=seq, created_ns=time.time_ns(),
                        volume_size=volume_size, block_size=block_size, extents=total,
                        parts=parts, top_crc=top_crc, **chain)
    try:
        store.put(names.checkpoint_manifest_key(volume, seq), manifest.to_json(), exclusive=True)
    except ObjectExists:
        pass  # the same map at the same seq was checkpointed already
    return manifest


def list_checkpoints(store: Store, volume: str) -> list[int]:
    seqs = []
    for info in store.list(names.checkpoint_prefix(volume)):
        seq = names.parse_checkpoint_seq(info.key)
        if seq is not None:
            seqs.append(seq)
    return sorted(seqs)


def list_incomplete_checkpoints(store: Store, volume: str) -> list[int]:
    """Seqs with checkpoint parts but no manifest: an interrupted write, or a
    delete that removed the manifest first.  Never read; safe to delete."""
    parts: set[int] = set()
    manifests: set[int] = set()
    for info in store.list(names.checkpoint_prefix(volume)):
        seq = names.parse_seq(info.key.rsplit("/", 2)[-2]) if info.key.count("/") >= 2 else None
        if seq is None:
            continue
        (manifests if info.key.endswith("/manifest") else parts).add(seq)
    return sorted(parts - manifests)


def read_manifest(store: Store, volume: str, seq: int) -> Manifest:
    key = names.checkpoint_manifest_key(volume, seq)
    return Manifest.from_json(store.get(key), where=key)


def _entries(store: Store, manifest: Manifest, kind: int, entry: struct.Struct) -> Iterator[tuple]:
    """The entries of every part of one kind, checked, one part in memory at a time."""
    for key, part_kind, count, crc in manifest.parts:
        if part_kind == kind:
            yield from entry.iter_unpack(_part_body(store, manifest, key, kind, count, crc, entry))


def _part_raw(store: Store, manifest: Manifest, key: str, crc: int) -> bytes:
    raw = store.get(key)
    if masked_crc(raw) != crc:
        raise CorruptionError(f"{key}: checkpoint part does not match its manifest", key=key)
    return raw


def _part_body(store: Store, manifest: Manifest, key: str, kind: int, count: int, crc: int,
               entry: struct.Struct) -> bytes:
    body = _decode_part(_part_raw(store, manifest, key, crc), seq=manifest.seq, kind=kind,
                        where=key)
    if len(body) != count * entry.size:
        raise CorruptionError(f"{key}: checkpoint part holds {len(body)} bytes for "
                              f"{count} entries", key=key)
    return body


def read_extents(store: Store, manifest: Manifest) -> Iterator[Extent]:
    """A base's extents, or a delta's entries (seq 0: a hole), in order."""
    kind = PART_DELTA_KIND if manifest.is_delta else PART_EXTENTS_KIND
    return map(Extent._make, _entries(store, manifest, kind, EXTENT_ENTRY))


def read_runs(store: Store, manifest: Manifest, *, ahead: int = 0,
              piece: int | None = None) -> Iterator[Run]:
    """A base's extents, or a delta's entries, in order, a packed run per
    part (lsbd.map.packed).  ahead: parts fetched, checked and unpacked in
    threads while the caller works on the one before (the store's reads
    and zlib let go of the GIL), each one more part in memory.

    piece: a run per `piece` entries instead, each unpacked as the caller
    comes to it, so that a reader holds a part's compressed bytes and one
    piece (PIECE_EXTENTS: under 1 MiB), not the part's 7 MiB of entries.
    A part that unpacks to other than its count of entries (its CRC
    checked, so written wrong) raises CorruptionError when its end is
    reached, after its first pieces: a caller makes nothing of what it
    read durable before the end (a checkpoint's manifest comes last, a
    map loaded from a chain gets its volume id last)."""
    kind = PART_DELTA_KIND if manifest.is_delta else PART_EXTENTS_KIND
    parts = [(key, count, crc) for key, part_kind, count, crc in manifest.parts
             if part_kind == kind]
    if piece is not None:
        def raw(part: tuple[str, int, int]) -> tuple[str, int, memoryview]:
            key, count, crc = part
            return key, count, _checked_packed(_part_raw(store, manifest, key, crc),
                                               seq=manifest.seq, kind=kind, where=key)

        for key, count, packed in _prefetched(raw, parts, ahead):
            for data in _inflated(packed, count * EXTENT_ENTRY.size,
                                  piece * EXTENT_ENTRY.size, key):
                yield Run(Part(data))
        return

    def body(part: tuple[str, int, int]) -> bytes:
        key, count, crc = part
        return _part_body(store, manifest, key, kind, count, crc, EXTENT_ENTRY)

    for data in _prefetched(body, parts, ahead):
        if data:
            yield Run(Part(data))


def _inflated(packed: memoryview, total: int, step: int, where: str) -> Iterator[bytes]:
    """The `total` bytes zlib-compressed in `packed`, in pieces of `step`
    bytes (the last may be shorter), inflated a piece at a time: never more
    than a piece of output and INFLATE_STEP of input in hand."""
    inflate = zlib.decompressobj()
    pending = bytearray()
    done = 0
    at = 0
    src: bytes | memoryview = b""
    try:
        while not inflate.eof:
            if not src:
                if at >= len(packed):
                    break
                src = packed[at:at + INFLATE_STEP]
                at += INFLATE_STEP
            before = len(src)
            out = inflate.decompress(src, step - len(pending))
            src = inflate.unconsumed_tail
            if not out and len(src) == before and not inflate.eof:
                break      # no progress: a stream cut short (checked below)
            pending += out
            if len(pending) >= step:
                done += len(pending)
                if done > total:
                    break
                yield bytes(pending)
                pending.clear()
        pending += inflate.flush()
    except zlib.error as e:
        raise CorruptionError(f"{where}: checkpoint part does not unpack ({e})", key=where) from e
    if not inflate.eof or inflate.unused_data or src or done + len(pending) != total:
        raise CorruptionError(f"{where}: checkpoint part does not hold its {total} bytes "
                              "of entries", key=where)
    for at in range(0, len(pending), step):
        yield bytes(pending[at:at + step])


def _prefetched(fn, items: list, ahead: int) -> Iterator:
    """map(fn, items), with up to `ahead` calls running ahead in threads."""
    if ahead <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="ckpt-read")
    try:
        pending: deque = deque()
        todo = iter(items)
        for item in todo:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_chain(store: Store, volume: str, manifest: Manifest) -> list[Manifest]:
    """The base and deltas that make up the map at `manifest`, base first.
    Raises CorruptionError or ObjectNotFound if one is missing or wrong."""
    chain = [manifest]
    while chain[-1].is_delta:
        prev = chain[-1].prev
        assert prev is not None
        m = read_manifest(store, volume, prev)
        if m.volume_id != manifest.volume_id or m.seq >= chain[-1].seq or \
                len(chain) > MAX_CHAIN + 1:
            raise CorruptionError(f"checkpoint {manifest.seq}: its chain is broken at "
                                  f"{prev}")
        chain.append(m)
    if chain[-1].seq != (manifest.base if manifest.is_delta else manifest.seq):
        raise CorruptionError(f"checkpoint {manifest.seq}: its chain does not start at "
                              "its base")
    return chain[::-1]


def chain_parents(store: Store, volume: str, seqs: Iterable[int]) -> dict[int, int]:
    """delta seq -> the checkpoint it lies over, for the deltas among `seqs`
    (one small GET each).  An unreadable manifest counts as a base."""
    out = {}
    for seq in seqs:
        try:
            m = read_manifest(store, volume, seq)
        except (CorruptionError, ObjectNotFound):
            continue
        if m.prev is not None:
            out[seq] = m.prev
    return out


def read_segments(store: Store, manifest: Manifest) -> list[SegmentInfo]:
    return [SegmentInfo(seq=seq, state=STORED, sealed_ns=sealed, size=size, live_blocks=0,
                        data_blocks=data_blocks, trailer_crc=0)
            for seq, sealed, size, data_blocks
            in _entries(store, manifest, PART_SEGMENTS_KIND, SEGMENT_ENTRY)]


def newest_valid_checkpoint(store: Store, volume: str, volume_id: str, *,
                            at_most: int | None = None) -> Manifest | None:
    """The newest checkpoint whose manifest and parts all check out (and whose
    seq is <= at_most), or None.  A bad one is logged and skipped."""
    for seq in reversed(list_checkpoints(store, volume)):
        if at_most is not None and seq > at_most:
            continue
        try:
            manifest = read_manifest(store, volume, seq)
            if manifest.volume_id != volume_id:
                raise CorruptionError(f"checkpoint {seq} belongs to another volume")
            for key, _kind, _count, crc in manifest.parts:
                if masked_crc(store.get(key)) != crc:
                    raise CorruptionError(f"{key}: part does not match its manifest", key=key)
            return manifest
        except (CorruptionError, ObjectNotFound) as e:
            log.warning("volume %s: skipping checkpoint %d: %s", volume, seq, e)
    return None


def delete_checkpoint(store: Store, volume: str, seq: int) -> None:
    """Manifest first, so a half-deleted checkpoint is never taken for whole."""
    store.delete(names.checkpoint_manifest_key(volume, seq))
    for info in store.list(names.checkpoint_dir(volume, seq)):
        store.delete(info.key)
