"""Local copies of sealed segments: the ones waiting to upload and a
bounded LRU cache of the ones read back from the store.  Every block read
from a sealed segment is checked against its CRC (DESIGN invariant 5).

All copies live in one folder, <cache>/segments/<seq>.seg, from the moment a
segment opens until the cache evicts it (only segments already in the store
are evicted), so a reader never races a rename."""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Callable

from lsbd.checksum import crc32c, mask
from lsbd.engine.segment import SegmentIndex, read_sealed_index
from lsbd.errors import CorruptionError, ObjectNotFound
from lsbd.store import Store

log = logging.getLogger(__name__)


class SegmentFiles:
    def __init__(self, folder: str, store: Store, key_of: Callable[[int], str], block_size: int,
                 *, cache_limit: int):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.store = store
        self.key_of = key_of   # seq -> object key (a clone's older seqs are its parent's)
        self.block_size = block_size
        self.cache_limit = cache_limit
        self._lock = threading.Lock()
        self._fetching: dict[int, threading.Lock] = {}
        self._cached: collections.OrderedDict[int, int] = collections.OrderedDict()  # evictable
        self._cached_bytes = 0
        self._indexes: collections.OrderedDict[int, SegmentIndex] = collections.OrderedDict()

    def path(self, seq: int) -> str:
        return os.path.join(self.folder, f"{seq:016x}.seg")

    def local_seqs(self) -> list[int]:
        out = []
        for name in os.listdir(self.folder):
            if name.endswith(".seg"):
                try:
                    out.append(int(name[:-4], 16))
                except ValueError:
                    pass
        return sorted(out)

    # --- the cache ------------------------------------------------------------

    def adopt(self, seq: int) -> None:
        """A local segment is now in the store: it may be evicted from here on."""
        try:
            size = os.path.getsize(self.path(seq))
        except FileNotFoundError:
            return
        with self._lock:
            if seq not in self._cached:
                self._cached[seq] = size
                self._cached_bytes += size
            self._cached.move_to_end(seq)
        self._evict()

    def _touch(self, seq: int) -> None:
        with self._lock:
            if seq in self._cached:
                self._cached.move_to_end(seq)

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self._cached_bytes <= self.cache_limit or len(self._cached) <= 1:
                    return
                seq, size = self._cached.popitem(last=False)
                self._cached_bytes -= size
                self._indexes.pop(seq, None)
            try:
                os.unlink(self.path(seq))
            except FileNotFoundError:
                pass

    def forget(self, seq: int) -> None:
        """Drop a local copy (the segment was deleted from the store)."""
        with self._lock:
            size = self._cached.pop(seq, None)
            if size is not None:
                self._cached_bytes -= size
            self._indexes.pop(seq, None)
        try:
            os.unlink(self.path(seq))
        except FileNotFoundError:
            pass

    def drop_index(self, seq: int) -> None:
        with self._lock:
            self._indexes.pop(seq, None)

    def _fetch(self, seq: int) -> None:
        """Download a whole segment into the cache (one GET; later reads of
        its neighbours are local)."""
        with self._lock:
            gate = self._fetching.setdefault(seq, threading.Lock())
        with gate:
            path = self.path(seq)
            if os.path.exists(path):
                return
            data = self.store.get(self.key_of(seq))
            tmp = path + ".part"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        with self._lock:
            self._fetching.pop(seq, None)
        self.adopt(seq)

    def index(self, seq: int) -> SegmentIndex:
        with self._lock:
            idx = self._indexes.get(seq)
            if idx is not None:
                self._indexes.move_to_end(seq)
                return idx
        where = self.key_of(seq)
        _trailer, records = read_sealed_index(self.path(seq), where=where)
        idx = SegmentIndex(records, self.block_size)
        with self._lock:
            self._indexes[seq] = idx
            while len(self._indexes) > 256:
                self._indexes.popitem(last=False)
        return idx

    # --- reads -------------------------------------------------------------------

    def read_blocks(self, seq: int, offset: int, nblocks: int) -> bytes:
        """nblocks blocks at file offset `offset` of sealed segment `seq`, checked."""
        for attempt in range(3):
            try:
                fd = os.open(self.path(seq), os.O_RDONLY)
            except FileNotFoundError:
                self._fetch(seq)
                continue
            try:
                self._touch(seq)
                idx = self.index(seq)
                data = os.pread(fd, nblocks * self.block_size, offset)
            finally:
                os.close(fd)
            self._check(seq, idx, offset, data, nblocks)
            return data
        raise ObjectNotFound(self.key_of(seq))

    def _check(self, seq: int, idx: SegmentIndex, offset: int, data: bytes, nblocks: int) -> None:
        bs = self.block_size
        where = self.key_of(seq)
        if len(data) != nblocks * bs:
            raise CorruptionError(f"{where}: short read at offset {offset}", key=where, offset=offset)
        view = memoryview(data)
        for i in range(nblocks):
            try:
                expected = idx.crc_at(offset + i * bs)
            except KeyError:
                raise CorruptionError(f"{where}: no block at offset {offset + i * bs}",
                                      key=where, offset=offset + i * bs) from None
            if mask(crc32c(view[i * bs:(i + 1) * bs])) != expected:
                log.error("checksum mismatch in segment %s at offset %d", where, offset + i * bs)
                raise CorruptionError(f"{where}: checksum mismatch at offset {offset + i * bs}",
                                      key=where, offset=offset + i * bs)


def check_open_blocks(data: bytes, crcs: list[int], block_size: int, *, where: str,
                      offset: int) -> None:
    view = memoryview(data)
    for i, expected in enumerate(crcs):
        if mask(crc32c(view[i * block_size:(i + 1) * block_size])) != expected:
            raise CorruptionError(f"{where}: checksum mismatch in the journal",
                                  key=where, offset=offset + i * block_size)


