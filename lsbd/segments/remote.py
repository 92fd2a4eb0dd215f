"""Reading the store's copies of sealed segments: which exist, and a
segment's index from its tail.  The read paths (a cold read, a seal) use
these, so they live apart from crash recovery."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

from lsbd import names
from lsbd.format.segment import TRAILER, Record, Trailer, decode_footer, decode_trailer, masked_crc
from lsbd.map.blockmap import SegmentInfo
from lsbd.segments import checkpoints as ckpt
from lsbd.segments import summary
from lsbd.errors import CorruptionError
from lsbd.store import ObjectInfo, Store
from lsbd.meta.config import VolumeConfig

log = logging.getLogger(__name__)

#: A segment's tail read in one GET: its trailer and, for most segments, its
#: whole index (32 MiB of files of 4-64 KiB made one of 68 KiB); a second GET
#: for the rest costs another round trip.
TAIL_READ = 128 * 1024
#: Index GETs in flight while a map is rebuilt: each is a round trip to a
#: store that may be 10-100 ms away.
INDEX_FETCHES = 16


def store_segment_seqs(store: Store, volume: str) -> dict[int, int]:
    """seq -> object size of every segment in the store."""
    return {seq: info.size for seq, info in store_segments(store, volume).items()}


def store_segments(store: Store, volume: str) -> dict[int, ObjectInfo]:
    """seq -> listing entry (size, ETag) of every segment in the store."""
    out = {}
    for info in store.list(names.segment_prefix(volume)):
        seq = names.parse_seq(info.key)
        if seq is not None:
            out[seq] = info
    return out


def fetch_segment_index(store: Store, volume: str, seq: int, size: int | None = None, *,
                        stored_size: int | None = None) -> tuple[Trailer, list[Record]]:
    """A stored segment's trailer and records, read from its tail (one GET,
    two for a large index)."""
    return fetch_index_by_key(store, names.segment_key(volume, seq), seq, size,
                              stored_size=stored_size)


def fetch_segment_indexes(store: Store, volume: str, seqs: Iterable[int], *,
                          ahead: int = INDEX_FETCHES, stored: dict[int, int] | None = None,
                          known: dict[int, summary.Entry] | None = None,
                          ) -> Iterator[tuple[int, Trailer, list[Record]]]:
    """(seq, trailer, records) of each of `seqs`, in their order, with up to
    `ahead` fetches in flight.  stored: the objects' sizes from a listing
    (store_segment_seqs), so that each tail is an explicit range.  known:
    map summary entries already matched to the listing (summary.usable),
    used instead of a GET when they check.  An error is raised where its
    seq comes; a caller that stops early leaves nothing running."""
    todo = iter(seqs)
    sizes = stored or {}
    summed = known or {}
    pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="lsbd-index")
    window: deque[tuple[int, Future]] = deque()

    def fetch(seq: int) -> Future:
        entry = summed.get(seq)
        if entry is not None:
            found = _from_summary(store, names.segment_key(volume, seq), entry)
            if found is not None:
                done: Future = Future()
                done.set_result(found)
                return done
        return pool.submit(fetch_segment_index, store, volume, seq,
                           stored_size=sizes.get(seq))

    try:
        for seq in todo:
            window.append((seq, fetch(seq)))
            if len(window) >= ahead:
                break
        while window:
            seq, fut = window.popleft()
            trailer, records = fut.result()
            for more in todo:
                window.append((more, fetch(more)))
                break
            yield seq, trailer, records
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _from_summary(store: Store, key: str,
                  entry: summary.Entry) -> tuple[Trailer, list[Record]] | None:
    """A segment's trailer and records from its map summary entry, and its
    layout kept by a sealing store; None (with a warning) if the entry does
    not check: the caller reads the segment's tail instead."""
    try:
        trailer, records = entry.decoded(key)
        plain = store.prime_layout(key, entry.layout, entry.stored_size) if entry.layout else None
        if plain is not None:
            if trailer.footer_offset + trailer.footer_length + TRAILER.size != plain:
                raise CorruptionError(f"{key}: summary entry does not match the object's "
                                      "size", key=key)
        return trailer, records
    except CorruptionError as e:
        log.warning("%s: map summary entry not used (%s); reading its index", key, e)
        return None


def fetch_index_by_key(store: Store, key: str, seq: int, size: int | None = None, *,
                       stored_size: int | None = None) -> tuple[Trailer, list[Record]]:
    """The trailer and index of the segment object `key` (fetch_footer_by_key,
    decoded)."""
    trailer, footer = fetch_footer_by_key(store, key, seq, size, stored_size=stored_size)
    return trailer, decode_footer(footer, trailer, where=key)


def fetch_footer_by_key(store: Store, key: str, seq: int, size: int | None = None, *,
                        stored_size: int | None = None) -> tuple[Trailer, bytes]:
    """The trailer and undecoded index of the segment object `key`.  `size`: the
    segment's own size (its local file's, or the map's), when known: the tail
    is then an explicit range, which every S3 server honours.  Else
    `stored_size`, the object's size from a listing: that is what the store
    holds, not the segment's size once a wrapper compresses or encrypts it,
    so the store reads the tail (Store.get_tail).  Without either, a suffix
    range, which the store checks (lsbd.store.s3)."""
    if size is not None:
        start = max(0, size - TAIL_READ)
        tail = store.get(key, start, size - start)
    else:
        tail = store.get_tail(key, TAIL_READ, stored_size=stored_size)
    trailer = decode_trailer(tail, where=key)
    if trailer.seq != seq:
        raise CorruptionError(f"{key}: trailer names seq {trailer.seq}", key=key)
    need = trailer.footer_length + TRAILER.size
    if need <= len(tail):
        footer = tail[len(tail) - need:len(tail) - TRAILER.size]
    else:
        footer = store.get(key, trailer.footer_offset, trailer.footer_length)
    return trailer, footer


def segment_info(seq: int, trailer: Trailer, records: list[Record], size: int, state: int,
                 raw_trailer: bytes) -> SegmentInfo:
    data_blocks = sum(r.nblocks for r in records if r.kind == 1)
    return SegmentInfo(seq=seq, state=state, sealed_ns=trailer.sealed_ns, size=size,
                       live_blocks=0, data_blocks=data_blocks, trailer_crc=masked_crc(raw_trailer))


def segment_times(store: Store, config: VolumeConfig) -> dict[int, int]:
    """seq -> sealed time (ns) of every segment of this volume still in the
    store: from the newest checkpoint's segment table, and from the trailers
    of the segments after it."""
    stored = store_segment_seqs(store, config.name)
    times: dict[int, int] = {}
    manifest = ckpt.newest_valid_checkpoint(store, config.name, config.volume_id)
    if manifest is not None:
        for info in ckpt.read_segments(store, manifest):
            if info.seq in stored:
                times[info.seq] = info.sealed_ns
    for seq in sorted(stored):
        if seq not in times:
            trailer, _records = fetch_segment_index(store, config.name, seq)
            times[seq] = trailer.sealed_ns
    return times
