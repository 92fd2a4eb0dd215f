"""PastVolume: a read-only view of a volume at a point (its newest state, a
snapshot, `--at`), for reading, export, diff, verify, restore and
checkpoints at kept points.  It takes no lease and starts no thread: its
private map is rebuilt from the store in a temporary folder, removed on
close."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

from lsbd.engine.reader import ReadFace, Reader
from lsbd.engine.opening import local_keys
from lsbd.engine.recovery import rebuild_from_store
from lsbd.engine.state import VolumeState
from lsbd.errors import ReadOnlyError
from lsbd.map.blockmap import BlockMap
from lsbd.meta.config import Lineage, VolumeConfig
from lsbd.segments import checkpoints as ckpt
from lsbd.segments.local import SegmentFiles
from lsbd.store import Store
from lsbd import private


class PastVolume(ReadFace):
    """The BlockDevice read API over a volume's state at seq `at_seq` (None:
    its newest state).  Every write raises ReadOnlyError."""

    supports_nowait = True
    read_only = True

    def __init__(self, store: Store, config: VolumeConfig, *, cache_root: str, flush_mode: str,
                 cache_limit: int, at_seq: int | None = None,
                 progress: Callable[[int, int], None] | None = None):
        private.make_dirs(cache_root, fix_existing=False)
        folder = tempfile.mkdtemp(prefix=f"{config.name}-ro-", dir=cache_root)
        self.store = store
        self.config = config
        self.name = config.name
        self.block_size = config.block_size
        self.flush_mode = flush_mode
        self.folder = folder
        self.cache_root = cache_root
        bmap = files = None
        try:
            self.lineage = lineage = Lineage.load(store, config)
            bmap = BlockMap(os.path.join(folder, "map"), config.block_size)
            files = SegmentFiles(os.path.join(folder, "segments"), store, lineage.segment_key,
                                 config.block_size, cache_limit=cache_limit,
                                 keys=local_keys(store, config), link_store_files=True)
            st = VolumeState(store=store, config=config, folder=folder, read_only=True,
                             flush_mode=flush_mode, lineage=lineage, bmap=bmap, files=files)
            plan, size = rebuild_from_store(bmap, store, config, upto=at_seq, progress=progress)
            st.applied, st.size = plan.top, size
        except BaseException:
            if files is not None:
                files.close()
            if bmap is not None:
                bmap.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._st = st
        self._reader = Reader(st)

    # -- reads ----------------------------------------------------------------------

    @property
    def stats(self) -> dict:
        return self._st.stats

    def usage(self) -> dict:
        st = self._st
        infos = st.map.segments()
        data = {"volume": self.name, "size": st.size, "applied_seq": st.applied,
                "durable_seq": st.applied, "uploads_pending": 0, "segments": len(infos),
                "segment_bytes": sum(i.size for i in infos),
                "live_bytes": sum(i.live_blocks for i in infos) * self.block_size,
                "extents": st.map.extent_count(), "map": st.map.map_stats(),
                "last_checkpoint": 0, "flush_mode": self.flush_mode}
        data.update(st.stats)
        return data

    def write_checkpoint_here(self) -> int:
        """Write a checkpoint of this state at its own seq, so that the point
        stays readable after compaction.  Returns the seq."""
        st = self._st
        if st.applied > 0:
            with st.map.snapshot() as snap:
                ckpt.write_checkpoint(self.store, self.name, self.config.volume_id, st.applied,
                                      volume_size=st.size, block_size=self.block_size,
                                      extents=snap.extents(), segments=snap.segments(),
                                      top_crc=st.map.get_int("top_crc") or None)
        return st.applied

    # -- writes: refused ------------------------------------------------------------

    def _refuse(self, *_args, **_kw):
        raise ReadOnlyError(f"volume {self.name} is open read-only")

    write = write_many = write_zeroes = trim = flush = resize = transaction = _refuse
    flush_to_store = checkpoint = snapshot = relocate = _refuse

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        st = self._st
        if st.closed:
            return
        st.closed = True
        st.files.close()
        try:
            st.map.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    abandon = close

    def __enter__(self) -> "PastVolume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

