"""Opening a volume for writing: trust the cache dir or rebuild it from the
store, replay the journals newer than the map, remove orphans, then start
the uploader with what is still to upload.  The threads are started by the
Volume once this has succeeded."""

from __future__ import annotations

import logging
import os
import shutil
import time

from lsbd import fileio, names, private
from lsbd.checksum import masked_crc
from lsbd.engine.recovery import (
    MAX_ORPHANS,
    journal_is_sealed,
    list_for_open,
    rebuild_from_store,
    recover_journal_file,
)
from lsbd.engine.sealer import Sealer
from lsbd.engine.state import VolumeState
from lsbd.engine.writer import room_needed
from lsbd.errors import CacheMismatch, CorruptionError, UserError
from lsbd.format.segment import HEADER_MAGIC, TRAILER
from lsbd.map.blockmap import PENDING, STORED, BlockMap, SegmentInfo
from lsbd.segments import summary
from lsbd.segments.local import SegmentFiles
from lsbd.segments.remote import fetch_segment_index, store_segment_seqs
from lsbd.segments.uploader import Uploader
from lsbd.meta.config import Lineage, VolumeConfig
from lsbd.meta.lease import Lease
from lsbd.names import cache_dir_for
from lsbd.store import Store
from lsbd.crypto.localfile import LocalKeys, LocalReader, rewrite

log = logging.getLogger(__name__)


def writer_state(store: Store, config: VolumeConfig, *, cache_root: str, flush_mode: str,
                 cache_limit: int, break_lease: bool) -> VolumeState:
    """Take the lease and open the cache dir's map and files."""
    lease = Lease.acquire(store, config.name, break_lease=break_lease)
    try:
        folder = cache_dir_for(cache_root, store, config.name)
        private.make_dirs(folder)
        lineage = Lineage.load(store, config)
        files = SegmentFiles(os.path.join(folder, "segments"), store, lineage.segment_key,
                             config.block_size, cache_limit=cache_limit,
                             keep_free=room_needed(config.segment_size),
                             keys=local_keys(store, config))
        return VolumeState(store=store, config=config, folder=folder, read_only=False,
                           flush_mode=flush_mode, lineage=lineage, files=files, lease=lease,
                           bmap=BlockMap(os.path.join(folder, "map"), config.block_size))
    except BaseException:
        lease.release()
        raise


def recover(st: VolumeState, sealer: Sealer, progress) -> bool:
    """Bring the map up to everything this writer may build on, then start
    the uploader (no threads of the volume run yet).  True if the map was
    rebuilt from the store (a new or untrusted cache dir: no data here)."""
    checkpoints: list[int] | None = None
    known: dict[int, summary.Entry] = {}
    rebuilt = False
    if st.map.get_meta("volume_id") is None:
        # A new cache dir: the map comes from the store; both listings and
        # the map summary at once.
        stored, checkpoints, known = list_for_open(st.store, st.name,
                                                   st.config.volume_id_bytes)
    else:
        stored = store_segment_seqs(st.store, st.name)
    _encrypt_clear_files(st)
    try:
        _check_cache_identity(st, stored)
        _replay_local(st, sealer)
    except CacheMismatch as e:
        report = log.info if str(e) == "empty" else log.warning
        report("volume %s: the cache dir is not trusted (%s); rebuilding it from the store",
               st.name, e)
        if not _made_by_this_open(st):
            _reset_cache_dir(st)
        _rebuild(st, progress, stored, checkpoints, known)
        rebuilt = True
    _remove_orphans(st, stored)
    _start_uploads(st, sealer)
    return rebuilt


def local_keys(store: Store, config: VolumeConfig) -> LocalKeys | None:
    """The keys of an encrypted volume's files in the cache dir (None: the
    volume is not encrypted, and its files stay in the clear)."""
    keys = None
    if store.seals_objects:
        # Imported here: a plain volume's open need not load the sealing code.
        from lsbd.crypto.store import volume_keys
        keys = volume_keys(store, config.name, names.segment_key(config.name, 1))
    if config.encryption and keys is None:
        raise UserError(f"volume {config.name} is encrypted: open it through "
                        "lsbd.crypto.store.SealingStore")
    return keys


def _encrypt_clear_files(st: VolumeState) -> None:
    """An encrypted volume's cache dir left by an lsbd that kept it in the
    clear: segment files already in the store are dropped (the store has
    them), the others (journals, segments waiting to upload) are encrypted
    into new files, before anything reads them."""
    keys = st.files.keys
    if keys is None:
        return
    dropped = encrypted = 0
    for seq in st.files.local_seqs():
        path = st.files.path(seq)
        with open(path, "rb") as f:
            if f.read(len(HEADER_MAGIC)) != HEADER_MAGIC:
                continue   # encrypted (or too torn to be anything: recovery drops it)
        info = st.map.segment(seq)
        if info is not None and info.state == STORED:
            os.unlink(path)
            dropped += 1
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            new_fd, _ = rewrite(path, LocalReader(fd, None), os.fstat(fd).st_size, keys)
            os.close(new_fd)
        finally:
            os.close(fd)
        encrypted += 1
    if dropped or encrypted:
        log.warning("volume %s: the cache dir held %d segment files in the clear (from an "
                    "older lsbd): %d already in the store were removed, %d encrypted; their "
                    "clear bytes may remain in the disk's free space", st.name,
                    dropped + encrypted, dropped, encrypted)


def _check_cache_identity(st: VolumeState, stored: dict[int, int]) -> None:
    m = st.map
    vid = m.get_meta("volume_id")
    if vid is None:
        raise CacheMismatch("empty")
    if vid.decode() != st.config.volume_id:
        raise CacheMismatch("it belongs to another volume")
    if (m.get_meta("store_url") or b"").decode() != st.store.url:
        raise CacheMismatch("it belongs to another store")
    applied = m.get_int("applied_seq")
    local = set(st.files.local_seqs())
    foreign = [s for s in stored if s > applied and s not in local]
    if foreign and min(foreign) == applied + 1:
        # Another writer went on from our history (it broke our lease)?  Or
        # leftovers of a writer that had lost the lease (not chained to us:
        # orphans, removed below)?
        trailer, _ = fetch_segment_index(st.store, st.name, applied + 1)
        if trailer.prev_crc == m.get_int("top_crc"):
            raise CacheMismatch(f"the store has segments it does not know "
                                f"(seq {applied + 1} on)")
    # Our newest stored segment must be the very object we wrote.
    ours = [s for s in stored if s <= applied]
    if ours:
        top = max(ours)
        info = m.segment(top)
        if info is not None and info.trailer_crc:
            # A suffix range, checked by the store (lsbd.store.s3): the map's
            # size of a segment rebuilt from a listing is what the store
            # holds, not the segment's own once a wrapper seals it.
            tail = st.store.get(names.segment_key(st.name, top), -TRAILER.size)
            if masked_crc(tail) != info.trailer_crc:
                raise CacheMismatch(f"segment {top} in the store is not the one it holds")
    st.applied = applied
    st.prev_crc = m.get_int("top_crc")
    st.size = m.get_int("size", st.config.size)
    st.last_checkpoint = m.get_int("last_checkpoint")


def _replay_local(st: VolumeState, sealer: Sealer) -> None:
    """Apply journal files newer than the map (a crash between sealing and
    the map update, or an open segment cut short).  A journal cut short is
    the newest write that survived: the ones after it are discarded, and
    that is durable before it is sealed (sealed, it no longer shows it was
    cut short, and a power cut could bring them back to be replayed)."""
    seqs = [s for s in st.files.local_seqs() if s > st.applied]
    for i, seq in enumerate(seqs):
        path = st.files.path(seq)
        if seq != st.applied + 1:
            raise CacheMismatch(f"journal file {path} (seq {seq}) after a gap")
        was_sealed = journal_is_sealed(path, st.files.keys)
        if not was_sealed:
            # Written after a journal that lost its tail (a power loss
            # before any flush covered it): not part of the prefix.
            _discard(st, seqs[i + 1:], "it follows one cut short, and no flush covered either")
        result = recover_journal_file(path, volume_id=st.config.volume_id_bytes,
                                      seq=seq, block_size=st.block_size,
                                      volume_size=st.size, prev_crc=st.prev_crc,
                                      keys=st.files.keys)
        if result is None:      # nothing committed in it: removed
            _discard(st, seqs[i + 1:], "it follows one cut short, and no flush covered either")
            return
        trailer, records = result
        if trailer.prev_crc != st.prev_crc:
            # Sealed after a predecessor that lost its tail since.
            _discard(st, [seq], "it does not continue the history")
            _discard(st, seqs[i + 1:], "it follows one that does not continue the history")
            return
        log.info("volume %s: replayed journal segment %d (%d records)", st.name, seq,
                 len(records))
        # A journal left by a crashed process may never have been synced,
        # name included: recovery synced its data, the map must not name it
        # before its name is durable too.
        fileio.fsync_dir(os.path.dirname(path))
        sealer.apply_sealed(seq, trailer, records, state=PENDING)
        if not was_sealed:
            return


def _discard(st: VolumeState, seqs: list[int], why: str) -> None:
    """Remove journal files that are no part of the history, durably (a
    removal a power cut undid would bring them back to be replayed)."""
    for seq in seqs:
        path = st.files.path(seq)
        if not os.path.exists(path):
            continue
        log.warning("volume %s: discarding journal file %s (seq %d): %s", st.name, path, seq,
                    why)
        os.unlink(path)
    if seqs:
        fileio.fsync_dir(st.files.folder)


def _rebuild(st: VolumeState, progress, stored: dict[int, int],
             checkpoints: list[int] | None, known: dict[int, summary.Entry]) -> None:
    plan, size = rebuild_from_store(st.map, st.store, st.config, progress=progress,
                                    stored=stored, checkpoints=checkpoints, known=known)
    st.applied, st.size = plan.top, size
    st.prev_crc = st.map.get_int("top_crc")
    st.last_checkpoint = plan.base
    st.map.set_meta(volume_id=st.config.volume_id.encode(), store_url=st.store.url.encode(),
                    last_checkpoint=str(plan.base).encode())
    # Durable before any journal is written: a map whose last commit (this
    # identity) a power cut undid would be distrusted, journals and all.
    st.map.sync()


def _remove_orphans(st: VolumeState, stored: dict[int, int]) -> None:
    orphans = sorted(s for s in stored if s > st.applied)
    if len(orphans) > MAX_ORPHANS:
        raise CorruptionError(
            f"volume {st.name}: segment {st.applied + 1} is missing but "
            f"{len(orphans)} later segments exist; refusing to open for writing "
            "(run lsbd verify)")
    for seq in orphans:
        log.warning("volume %s: removing orphan segment %d (after a gap: never part of "
                    "the volume)", st.name, seq)
        st.store.delete(names.segment_key(st.name, seq))


def _made_by_this_open(st: VolumeState) -> bool:
    """A cache dir with nothing in it but the new map this open made: no
    need to clear it (and to make its map again, a commit and a sync more)."""
    return (set(os.listdir(st.folder)) <= {"map", "segments"}
            and not os.listdir(st.files.folder) and st.map.is_new())


def _reset_cache_dir(st: VolumeState) -> None:
    """Move an untrusted cache dir aside if it holds data the store lacks,
    else delete it; then start a fresh one."""
    st.map.close()
    pending = [s.seq for s in _map_segments_safe(st) if s.state == PENDING]
    if pending:
        aside = f"{st.folder}.stale-{int(time.time())}"
        log.warning("volume %s: keeping the old cache dir as %s (it holds %d segments "
                    "never uploaded)", st.name, aside, len(pending))
        os.rename(st.folder, aside)
    else:
        shutil.rmtree(st.folder, ignore_errors=True)
    private.make_dirs(st.folder)
    st.map = BlockMap(os.path.join(st.folder, "map"), st.block_size)
    st.files.close()
    st.files = SegmentFiles(os.path.join(st.folder, "segments"), st.store,
                            st.lineage.segment_key, st.block_size,
                            cache_limit=st.files.cache_limit, keep_free=st.files.keep_free,
                            keys=st.files.keys)


def _map_segments_safe(st: VolumeState) -> list[SegmentInfo]:
    try:
        m = BlockMap(os.path.join(st.folder, "map"), st.block_size)
        try:
            return m.segments()
        finally:
            m.close()
    except Exception:  # noqa: BLE001 - an unreadable map is an untrusted one
        return []


def _start_uploads(st: VolumeState, sealer: Sealer) -> None:
    """The uploader, with every segment not yet in the store queued."""
    infos = st.map.segments()
    pending = [s.seq for s in infos if s.state == PENDING]
    stored = {s.seq for s in infos if s.state == STORED}
    # Everything below the first pending segment is durable; above it, the
    # segments already stored count as soon as the gaps below them fill.
    durable = (min(pending) - 1) if pending else max([st.applied, *stored])
    st.uploader = Uploader(st.store, st.name, st.files.path, sealer.on_stored,
                           durable_seq=durable, already_stored=stored,
                           fence=st.lease.check if st.lease is not None else None,
                           local_tail=st.files.local_tail,
                           segment_length=st.files.plain_size if st.files.keys else None)
    for seq in sorted(pending):
        st.uploader.submit(seq)
    for seq in st.files.local_seqs():
        info = st.map.segment(seq)
        if info is not None and info.state == STORED:
            st.files.adopt(seq)
