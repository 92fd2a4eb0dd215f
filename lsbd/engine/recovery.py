"""Opening a volume after anything: a clean close, a crash, a lost cache dir.

The planning is pure (plan_replay); the doing reads the store's segment
indexes and the journal files in the cache dir and feeds them to the map."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lsbd import fileio, names
from lsbd.engine.deltas import chain_extents, keep_mapped, produced_ahead
from lsbd.segments import checkpoints as ckpt
from lsbd.map.blockmap import STORED, BlockMap
from lsbd.meta.config import Lineage, VolumeConfig
from lsbd.format.segment import (
    FLAG_COMMIT,
    HEADER,
    RESIZE,
    Record,
    Trailer,
    decode_header,
    encode_footer,
    encode_trailer,
    masked_crc,
    read_sealed_index_from,
    scan_records,
)
from lsbd.crypto import localfile
from lsbd.crypto.localfile import LocalKeys
from lsbd.errors import CorruptionError, ObjectNotFound, PointUnavailable
from lsbd.segments.locallength import local_segment_size
from lsbd.segments import summary
from lsbd.segments.remote import (
    fetch_segment_indexes,
    segment_info,
    store_segment_seqs,
    store_segments,
)
from lsbd.plans.replay import ReplayPlan, plan_replay
from lsbd.store import Store

log = logging.getLogger(__name__)

#: More segments than this after a gap cannot be the tail of a crash (uploads
#: in flight): refuse to treat them as orphans.
MAX_ORPHANS = 64


def load_checkpoint(bm: BlockMap, store: Store, volume: str, manifest: ckpt.Manifest, *,
                    keep=lambda seq: True) -> None:
    """Make `bm` the map at a checkpoint: its base, then each delta of its
    chain laid over it.  The segment table is the checkpoint's own, less the
    segments `keep` rejects (compaction may have deleted them since)."""
    chain = ckpt.read_chain(store, volume, manifest)
    segments = [s for s in ckpt.read_segments(store, manifest) if keep(s.seq)]
    meta: dict[str, Any] = dict(applied_seq=str(manifest.seq).encode(),
                size=str(manifest.volume_size).encode(),
                top_crc=str(manifest.top_crc or 0).encode())
    bm.load(keep_mapped(produced_ahead(chain_extents(store, chain, bm.block_size))), segments,
            **meta)


def rebuild_from_store(bm: BlockMap, store: Store, config: VolumeConfig, *,
                       upto: int | None = None, progress=None,
                       stored: dict[int, int] | None = None,
                       checkpoints: list[int] | None = None,
                       known: dict[int, summary.Entry] | None = None) -> tuple[ReplayPlan, int]:
    """Rebuild the map from the newest valid checkpoint (at or before `upto`)
    and the segments after it.  Returns the plan carried out and the volume size.
    stored, checkpoints: the store's segments (seq -> size) and checkpoint
    seqs, when the caller has just listed them.  known: map summary entries
    matched to that listing (list_for_open), read instead of GETs."""
    volume = config.name
    if stored is None or checkpoints is None:
        stored, checkpoints = list_volume(store, volume, stored=stored)
    manifest = None
    for cp_seq in reversed(checkpoints):
        if (upto is not None and cp_seq > upto) or cp_seq < config.base_seq:
            continue
        try:
            manifest = ckpt.read_manifest(store, volume, cp_seq)
            if manifest.volume_id != config.volume_id:
                raise CorruptionError("checkpoint of another volume")
            load_checkpoint(bm, store, volume, manifest,
                            keep=lambda s: s in stored or s <= config.base_seq)
            break
        except (CorruptionError, ObjectNotFound) as e:
            log.warning("volume %s: checkpoint %d unusable (%s); trying an older one",
                        volume, cp_seq, e)
            manifest = None
    size = manifest.volume_size if manifest else config.size
    if manifest is None and config.parent:
        # A clone without a checkpoint of its own starts from its parent's state.
        parent = Lineage.load(store, config).chain[1]
        parent_plan, size = rebuild_from_store(bm, store, parent, upto=config.base_seq)
        if parent_plan.top != config.base_seq:
            raise CorruptionError(f"volume {volume} is a clone of {parent.name} at seq "
                                  f"{config.base_seq}, but that volume only reaches "
                                  f"{parent_plan.top}")
    elif manifest is None:
        bm.load([], [], applied_seq=b"0", size=str(config.size).encode(), top_crc=b"0")
    base = manifest.seq if manifest else config.base_seq
    plan = plan_replay(stored, base, upto=upto)
    # The chain: each segment names its predecessor's trailer.  Unknown (0) only
    # after a checkpoint that did not record it.
    prev: int | None = bm.get_int("top_crc", 0)
    if manifest is not None and not manifest.top_crc:
        prev = None
    applied: list[int] = []
    for i, (seq, trailer, records) in enumerate(fetch_segment_indexes(store, volume,
                                                                      plan.replay,
                                                                      stored=stored,
                                                                      known=known)):
        key = names.segment_key(volume, seq)
        if trailer.volume_id != config.volume_id_bytes:
            raise CorruptionError(f"{key} belongs to another volume", key=key)
        if prev is not None and trailer.prev_crc != prev:
            log.warning("volume %s: %s does not continue the history (written by a writer "
                        "that had lost the lease?); stopping before it", volume, key)
            break
        size = trailer.volume_size
        info = segment_info(seq, trailer, records, stored[seq], STORED, encode_trailer(trailer))
        bm.apply_segment(info, records, applied_seq=str(seq).encode(), size=str(size).encode(),
                         top_crc=str(info.trailer_crc).encode())
        prev = info.trailer_crc
        applied.append(seq)
        if progress:
            progress(i + 1, len(plan.replay))
    if len(applied) < len(plan.replay):
        rest = plan.replay[len(applied):]
        plan = ReplayPlan(base=plan.base, replay=applied,
                          orphans=sorted(set(rest) | set(plan.orphans)) if upto is None else [])
    if upto is not None and plan.top != upto:
        raise PointUnavailable(f"volume {volume}: seq {upto} can no longer be rebuilt (the "
                               f"history reaches {plan.top}; later or reclaimed segments are "
                               "missing)")
    if upto is not None and manifest is not None:
        # A checkpoint kept only because a later delta lies over it is no
        # kept point: compaction may have deleted segments its map uses.
        gone = {seq for seq in bm.referenced_seqs()
                if seq not in stored and seq > config.base_seq}
        if gone:
            raise PointUnavailable(f"volume {volume}: seq {upto} can no longer be rebuilt "
                                   f"(compaction reclaimed {len(gone)} of the segments it uses)")
    return plan, size


def list_volume(store: Store, volume: str, *,
                stored: dict[int, int] | None = None) -> tuple[dict[int, int], list[int]]:
    """The store's segments of `volume` (seq -> size) and its checkpoint
    seqs, listed at the same time (each LIST is a round trip)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsbd-list") as pool:
        checkpoints = pool.submit(ckpt.list_checkpoints, store, volume)
        if stored is None:
            stored = store_segment_seqs(store, volume)
        return stored, checkpoints.result()


def list_for_open(store: Store, volume: str, volume_id: bytes,
                  ) -> tuple[dict[int, int], list[int], dict[int, summary.Entry]]:
    """list_volume, and with it (at the same time: each is a round trip)
    the volume's map summary, whose entries are matched to the listing
    (summary.usable): an entry is used only for the very object it was
    taken from.  Only from a store whose listing tags objects."""
    if not store.lists_etags:
        stored, checkpoints = list_volume(store, volume)
        return stored, checkpoints, {}
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="lsbd-list") as pool:
        cps = pool.submit(ckpt.list_checkpoints, store, volume)
        entries = pool.submit(summary.read, store, volume, volume_id)
        listing = store_segments(store, volume)
        known = summary.usable(entries.result(), listing)
        return {seq: info.size for seq, info in listing.items()}, cps.result(), known


def journal_is_sealed(path: str, keys: LocalKeys | None = None) -> bool:
    """Whether a journal file is a whole sealed segment (index and trailer valid)."""
    try:
        r = localfile.open_reader(path, keys, where=f"journal {path}")
    except (OSError, CorruptionError):
        return False
    try:
        read_sealed_index_from(r.pread, local_segment_size(r), where=f"journal {path}")
        return True
    except CorruptionError:
        return False
    finally:
        os.close(r.fd)


def recover_journal_file(path: str, *, volume_id: bytes, seq: int, block_size: int,
                         volume_size: int, prev_crc: int,
                         keys: LocalKeys | None = None) -> tuple[Trailer, list[Record]] | None:
    """Make a journal file left by a crash into a sealed segment: keep its
    records up to the last committed transaction, drop the torn tail, append
    the index.  Returns None (and removes the file) if nothing was committed.
    A file that is already sealed is only read.  keys: the file is
    encrypted (lsbd.crypto.localfile); its torn tail may have been written
    under its key, so the kept records go into a new file under a new key
    rather than the index being written where the tail was."""
    where = f"journal {path}"
    try:
        r = localfile.open_reader(path, keys, where=where)
    except CorruptionError as e:
        with open(path, "rb") as f:
            head = f.read(localfile.HEADER_SIZE)
        if len(head) == localfile.HEADER_SIZE and localfile.has_header(head):
            raise    # a whole header that fails, or names a key we lack: keep the file
        # Cut before its header was whole (a flush syncs the header with the
        # first records): it never held a record that a flush covered.
        log.warning("%s: %s; removing it", where, e)
        os.unlink(path)
        return None
    try:
        return _recover(r, path, where, volume_id=volume_id, seq=seq, block_size=block_size,
                        volume_size=volume_size, prev_crc=prev_crc, keys=keys)
    finally:
        os.close(r.fd)


def _recover(r: localfile.LocalReader, path: str, where: str, *, volume_id: bytes, seq: int,
             block_size: int, volume_size: int, prev_crc: int,
             keys: LocalKeys | None) -> tuple[Trailer, list[Record]] | None:
    try:
        sealed = read_sealed_index_from(r.pread, local_segment_size(r), where=where)
    except CorruptionError:
        pass
    else:
        # Sealed but not synced and finished before the crash: it may still
        # hold the blocks its journal reserved past its end (journal.py).
        # Cutting it at its own size gives them back and changes no byte.
        # (A file a sealing by link appended to was cut at its final size
        # then, and made read-only: lsbd.crypto.linked.)
        if os.stat(path).st_mode & 0o200:
            os.truncate(path, os.path.getsize(path))
        # Sealed by a process that crashed before syncing it: the map must
        # not name it before it is durable.
        fileio.fsync(r.fd)
        return sealed
    if r.size() < HEADER.size:
        # Cut before its header was whole: it never held a record.
        os.unlink(path)
        return None
    header = decode_header(r.pread(HEADER.size, 0), where=where)
    if header.volume_id != volume_id or header.seq != seq or header.block_size != block_size:
        raise CorruptionError(f"{where}: belongs to another volume or seq", key=where)
    records: list[Record] = []
    committed = 0
    end = HEADER.size
    size = volume_size
    for record, rec_end in scan_records(r, block_size, HEADER.size, where=where):
        records.append(record)
        if record.flags & FLAG_COMMIT:
            committed = len(records)
            end = rec_end
    records = records[:committed]
    if not records:
        os.unlink(path)
        return None
    for rec in records:
        if rec.kind == RESIZE:
            size = rec.lba
    dropped = r.size() - end
    if dropped:
        log.warning("%s: dropped %d bytes of uncommitted tail", where, dropped)
    footer = encode_footer(records)
    trailer = Trailer(volume_id=volume_id, seq=seq, footer_offset=end,
                      footer_length=len(footer), record_count=len(records),
                      sealed_ns=time.time_ns(), volume_size=size,
                      footer_crc=masked_crc(footer), prev_crc=prev_crc)
    tail = footer + encode_trailer(trailer)
    if keys is not None:
        fd, _cipher = localfile.rewrite(path, r, end, keys, tail=tail)
        os.close(fd)
        return trailer, records
    with open(path, "r+b") as f:
        f.truncate(end)
        f.seek(end)
        f.write(tail)
        f.flush()
        fileio.fsync(f.fileno())
    return trailer, records


