"""The cache folder of a volume's segments: local copies of sealed segments
(the ones waiting to upload, and a bounded LRU of the ones already
uploaded), a cache of open descriptors, a cache of parsed indexes, what is
known of segments not here (where an evicted one's data ends; which ones
were found not local), and whole-segment fetches from the store, read from
memory while they are written into the folder (lsbd.segments.held).  The
reads over them are SegmentFiles' (lsbd.segments.local).

All local copies live in one folder, <cache>/segments/<seq>.seg, from the
moment a segment opens until the cache evicts it (only segments already in
the store are evicted), so a reader never races a rename.

Local files are read through a small cache of open file descriptors (an
open/close pair costs as much as the read of a block).  A descriptor is
reference-counted while a read uses it, so evicting or forgetting a file
never closes a descriptor under a reader (it is closed by the last one).

On an encrypted volume (keys given) every file here is encrypted at rest
(lsbd.crypto.localfile): journals as they are appended, segments fetched
from the store as they are written; reads decrypt after the pread."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import resource
import threading
from typing import Callable

from lsbd.crypto import localfile
from lsbd.crypto.localfile import LocalKeys, LocalReader
from lsbd.errors import CorruptionError
from lsbd.format.segment import (TRAILER, Record, SegmentIndex, decode_trailer, index_of_footer,
                                 read_sealed_footer_from, read_sealed_index_from)
from lsbd.segments.held import HELD_BYTES, HeldSegments
from lsbd.segments.locallength import local_segment_size
from lsbd.segments.advice import WholeAdvice
from lsbd.segments.openfile import OpenFile
from lsbd.segments.fetch import Fetcher
from lsbd.segments.remote import fetch_footer_by_key
from lsbd.linux import disk_free
from lsbd.store import Store
from lsbd import private

log = logging.getLogger(__name__)

# Parsed segment indexes kept in memory, by their size: a segment of random
# 4 KiB writes has an index of about 64 KiB, and the process's memory must
# not grow with the number of segments a read touches.
INDEX_CACHE_BYTES = 48 << 20
_UNREAD_REMEMBERED = 4096   # segments fetched whole and not read yet, at most
_AWAY_REMEMBERED = 65536    # segments remembered as not local, at most
#: Stored segments whose data's end is remembered (their trailer read, or
#: their local copy's when it was evicted), for reads without their index
#: (SegmentFiles._read_store_records).
DATA_ENDS_REMEMBERED = 4096
# Local segment files kept open for reads: 512 covers a 16 GiB working set of
# 32 MiB segments, within a quarter of the process's descriptor limit.
OPEN_FILES = max(16, min(512, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))


class LocalCopies:
    """The segment files of one cache folder and what is kept about them;
    SegmentFiles (lsbd.segments.local) adds the reads."""

    def __init__(self, folder: str, store: Store, key_of: Callable[[int], str], block_size: int,
                 *, cache_limit: int, keep_free: int = 0, keys: LocalKeys | None = None,
                 link_store_files: bool = False):
        private.make_dirs(folder)
        self.keys = keys     # an encrypted volume's: every file here is encrypted
        for name in os.listdir(folder):
            if name.endswith((".rekey", ".part")):   # left by a crash
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
        # The cache also gives way to the disk: segments already in the
        # store are evicted while the disk has less than this free (room for
        # the next journal and the map), whatever cache_limit says.
        self.keep_free = keep_free
        self.folder = folder
        self._prefix = os.path.join(folder, "")
        self.store = store
        #: a file:// store: its objects are files on this machine, so nothing is
        #: fetched whole, and a long read reads them itself
        self.store_is_local = store.url.startswith("file://")
        self.key_of = key_of   # seq -> object key (a clone's older seqs are its parent's)
        self.block_size = block_size
        self.cache_limit = cache_limit
        self._lock = threading.Lock()
        self._cached: collections.OrderedDict[int, int] = collections.OrderedDict()  # evictable
        self._cached_bytes = 0
        # For `lsbd stats`: segments the cache evicted, and the bytes of the
        # blocks reads took from local sealed copies and from the store.
        self.counts = {"cache_evicted_segments": 0, "cache_evicted_bytes": 0,
                       "local_read_bytes": 0, "store_read_bytes": 0}
        self._indexes: collections.OrderedDict[int, SegmentIndex] = collections.OrderedDict()
        self._index_bytes = 0
        self._loading: dict[int, threading.Lock] = {}   # seq -> held while its index loads
        self._files: collections.OrderedDict[int, OpenFile] = collections.OrderedDict()
        # Background threads (a whole-segment fetch, an upload finishing) may
        # outlive close(): they change the folder only under this lock, and
        # not at all once it is closed (a new writer may own it by then).
        self._folder_lock = threading.Lock()
        self._closed = False
        self.fetcher = Fetcher(self._fetch_whole, enabled=not self.store_is_local,
                               room=self._room_ahead)
        # link_store_files: a plain volume's objects in a file:// store are
        # its sealed segment files byte for byte, so a read-only view links
        # them into its private folder rather than read them block by block
        # through the store.  Sealed objects, and stores that wrap the local
        # one (faults in tests), are read.
        self._object_file: Callable[[str], str | None] | None = (
            store.object_file if link_store_files else None)
        # Called with a seq when a read first reads that segment fetched whole
        # (or waits for that fetch): the reader above starts fetching the
        # segments it will likely want next (lsbd.engine.reader).
        self.on_stream: Callable[[int], None] | None = None
        self._unread: set[int] = set()    # fetched whole, not read since
        self._whole: collections.OrderedDict[int, None] = collections.OrderedDict()  # read ahead
        #: files read ahead whole, advised on a thread of their own
        self.whole_advice = WholeAdvice(self._release)
        # stored segments read without their index: seq -> where its data ends
        self._data_ends: collections.OrderedDict[int, int] = collections.OrderedDict()
        # Segments found not local (is_local), and how many local copies
        # appeared since the count began: a read asks again for every stored
        # segment it touches, and a stat that fails costs as much as a
        # piece's read.  Only a copy made here makes a seq local again (a
        # fetch, a link from the store), and each one clears this.
        self._away: set[int] = set()
        self._copies_made = 0
        self.held = HeldSegments(min(HELD_BYTES, cache_limit // 4))
        self.held.on_room = self.fetcher.room_made

    def path(self, seq: int) -> str:
        return f"{self._prefix}{seq:016x}.seg"

    def open_reader(self, seq: int) -> LocalReader:
        """A reader of the local file of `seq` (close its fd when done);
        FileNotFoundError if there is none, CorruptionError if it cannot be
        read (an encrypted volume's file in the clear, a damaged header)."""
        return localfile.open_reader(self.path(seq), self.keys, where=self.key_of(seq))

    def plain_size(self, seq: int) -> int:
        """The segment's size in bytes, from its local file (never the
        file's size: a sealing by link appends to it, lsbd.crypto.linked)."""
        r = self.open_reader(seq)
        try:
            return local_segment_size(r)
        finally:
            os.close(r.fd)

    def sealed_records(self, seq: int) -> list[Record]:
        """The records of the local sealed segment `seq` (OSError,
        CorruptionError if it is not there or not sealed whole)."""
        r = self.open_reader(seq)
        try:
            return read_sealed_index_from(r.pread, local_segment_size(r),
                                          where=self.key_of(seq))[1]
        finally:
            os.close(r.fd)

    def local_tail(self, seq: int, n: int) -> tuple[int, bytes]:
        """The segment's size and its last n bytes, from its local file."""
        r = self.open_reader(seq)
        try:
            size = local_segment_size(r)
            return size, r.pread(n, max(0, size - n))
        finally:
            os.close(r.fd)

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
        """A local segment is now in the store: it may be evicted from here on,
        unless it is the store's own file (a file:// store on the same file
        system links the segment in): evicting that would free no space and
        only turn local reads into store reads."""
        with self._folder_lock:
            if not self._closed:
                self._adopt_locked(seq)

    def _adopt_locked(self, seq: int) -> None:
        try:
            st = os.stat(self.path(seq))
        except FileNotFoundError:
            return
        if st.st_nlink > 1:
            return
        with self._lock:
            if seq not in self._cached:
                self._cached[seq] = st.st_size
                self._cached_bytes += st.st_size
            self._cached.move_to_end(seq)
        self._evict()

    def is_local(self, seq: int) -> bool:
        """Whether reads of `seq` are served from a local file (or from its
        fetched bytes while the file is written); a file:// store's file is
        linked in here if it may be (link_store_files).  A segment found not
        here is taken as not here, without a look, until a copy is made here
        (_copy_made)."""
        if seq in self._files or seq in self.held:    # membership: one step under the GIL
            return True
        if seq in self._away:
            return False
        made = self._copies_made
        if os.path.exists(self.path(seq)) or self._link_from_store(seq):
            return True
        with self._lock:
            if made == self._copies_made:   # no copy made meanwhile: still away
                if len(self._away) >= _AWAY_REMEMBERED:
                    self._away.clear()
                self._away.add(seq)
        return False

    def _copy_made(self, seq: int) -> None:
        """A local copy of `seq` is in the folder now (fetched, linked):
        nothing found away before may be taken as away any longer."""
        with self._lock:
            self._copies_made += 1
            self._away.clear()

    def _link_from_store(self, seq: int) -> bool:
        """Link the store's file of sealed segment `seq` in as its local copy
        (see __init__); whether there is one now."""
        object_file = self._object_file
        if object_file is None:
            return False
        with self._folder_lock:
            if self._closed:
                return False
            source = object_file(self.key_of(seq))
            if source is None:      # sealed objects: never linkable
                self._object_file = None
                return False
            try:
                os.link(source, self.path(seq))
            except FileExistsError:
                pass
            except FileNotFoundError:
                return False       # not in the store (or deleted): read as before
            except OSError as e:   # another file system (EXDEV), or not allowed
                log.info("segment files cannot be linked from the store (%s): reading "
                         "them through it", e)
                self._object_file = None
                return False
        self._copy_made(seq)
        return True

    def _evict(self) -> None:
        while True:
            with self._lock:
                if not self._cached:
                    return
                if self._cached_bytes <= self.cache_limit or len(self._cached) <= 1:
                    if not self.keep_free or disk_free(self.folder) >= self.keep_free:
                        return
                seq = self._evict_oldest_locked()
            self._leave(seq)

    def make_room(self, need: int) -> bool:
        """Evict segments already in the store, least recently used first,
        until `need` bytes are free on the disk.  False if that was not
        enough (what remains waits for upload, or is not ours)."""
        while disk_free(self.folder) < need:
            with self._lock:
                if not self._cached:
                    return False
                seq = self._evict_oldest_locked()
            self._leave(seq)
        return True

    def _evict_oldest_locked(self) -> int:
        """Take the least recently used segment out of the cache (its file
        is unlinked after the lock is let go); returns its seq."""
        seq, size = self._cached.popitem(last=False)
        self._cached_bytes -= size
        self.counts["cache_evicted_segments"] += 1
        self.counts["cache_evicted_bytes"] += size
        self._drop_index_locked(seq)
        self._retire_locked(seq)
        return seq

    def _leave(self, seq: int) -> None:
        """Unlink an evicted segment's file, remembering where its data ends
        (its trailer, the store's object's too): reads of it from the store
        then need no read of the object's trailer first
        (SegmentFiles._read_store_records)."""
        try:
            _size, tail = self.local_tail(seq, TRAILER.size)
            trailer = decode_trailer(tail, where=self.key_of(seq))
        except (OSError, CorruptionError):
            trailer = None     # read from the store's trailer when needed
        if trailer is not None and trailer.seq == seq:
            with self._lock:
                self._data_ends[seq] = trailer.footer_offset
                while len(self._data_ends) > DATA_ENDS_REMEMBERED:
                    self._data_ends.popitem(last=False)
        self._unlink(seq)

    def _unlink(self, seq: int) -> None:
        try:
            os.unlink(self.path(seq))
        except FileNotFoundError:
            pass

    def cache_state(self) -> dict:
        """For `lsbd stats`: the evictable cache and the disk under it."""
        with self._lock:
            cached, count = self._cached_bytes, len(self._cached)
            counts = dict(self.counts)
        return {"cache_bytes": cached, "cache_segments": count, "cache_limit": self.cache_limit,
                "cache_disk_free": disk_free(self.folder), **counts}

    def count_read(self, *, local: int = 0, store: int = 0) -> None:
        """Note bytes of sealed segments' blocks read from local copies (or
        a fetched copy still held in memory) and from the store."""
        with self._lock:
            counts = self.counts
            counts["local_read_bytes"] += local
            counts["store_read_bytes"] += store

    def forget(self, seq: int) -> None:
        """Drop a local copy (the segment was deleted from the store)."""
        self.held.drop(seq)
        with self._lock:
            size = self._cached.pop(seq, None)
            if size is not None:
                self._cached_bytes -= size
            self._drop_index_locked(seq)
            self._data_ends.pop(seq, None)
            self._retire_locked(seq)
        self._unlink(seq)

    def drop_page_cache(self, seqs: list[int]) -> None:
        """Let the kernel drop the cached pages of these local segment files
        (synced, so the pages are clean).  A log writes into new pages all
        the time: pages freed here are the ones it gets next, and reusing
        pages is far cheaper than getting fresh ones (measured on a VM:
        0.2 ms per MiB against 2.3 ms).  Reads of these files still work,
        from the disk."""
        for seq in seqs:
            with self._lock:
                if self._closed:
                    return
                f = self._files.get(seq)
                if f is not None:
                    f.users += 1
            try:
                if f is not None:
                    os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)
                else:
                    fd = os.open(self.path(seq), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
            except OSError:
                pass    # not local, or no fadvise here: only a missed saving
            finally:
                if f is not None:
                    self._release(f)

    def drop_file(self, seq: int) -> None:
        """The local file of `seq` is about to be removed or replaced by a new
        file of the same name (an empty journal discarded): stop using it."""
        with self._lock:
            self._retire_locked(seq)

    def _retire_locked(self, seq: int) -> None:
        f = self._files.pop(seq, None)
        if f is not None:
            if f.users:
                f.retired = True
            else:
                os.close(f.fd)

    def _acquire(self, seq: int) -> OpenFile | None:
        """A held descriptor of the local file of `seq`, or None if there is none."""
        with self._lock:
            f = self._files.get(seq)
            if f is not None:
                f.users += 1
                self._files.move_to_end(seq)
                if seq in self._cached:
                    self._cached.move_to_end(seq)
                return f
        try:
            fd = os.open(self.path(seq), os.O_RDONLY)
        except FileNotFoundError:
            if not self._link_from_store(seq):
                return None
            try:
                fd = os.open(self.path(seq), os.O_RDONLY)
            except FileNotFoundError:   # forgotten meanwhile
                return None
        try:
            reader = localfile.reader_of(fd, self.keys, where=self.key_of(seq))
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            f = self._files.get(seq)
            if f is None:
                f = self._files[seq] = OpenFile(reader)
                while len(self._files) > OPEN_FILES:
                    old, _ = next(iter(self._files.items()))
                    self._retire_locked(old)
            else:  # another reader opened it first
                os.close(fd)
            f.users += 1
            if seq in self._cached:
                self._cached.move_to_end(seq)
            return f

    def _release(self, f: OpenFile) -> None:
        with self._lock:
            f.users -= 1
            if f.retired and not f.users:
                os.close(f.fd)

    def prefetch(self, seq: int, *, mark: bool = False):
        """Fetch segment `seq` whole into the cache in the background, unless
        it is local; returns the fetch's future, or None.  mark: see
        Fetcher.prefetch."""
        if self.is_local(seq):
            return None
        return self.fetcher.prefetch(seq, mark=mark)

    def _room_ahead(self, in_flight: int) -> bool:
        """Whether one more segment may be fetched ahead of a reader while
        `in_flight` are: what is held for it and not read yet, those
        fetches and this one (each taken as large as the last one fetched)
        fit in the held limit; more would be let go before the reader got
        there.  One at least, whatever the limit."""
        held = self.held
        ahead = held.ahead_bytes()
        if not ahead and not in_flight:
            return True
        return ahead + (in_flight + 1) * held.segment_bytes <= held.limit

    def _fetch_whole(self, seq: int, ready: Callable[[], None] | None = None) -> None:
        """Fetch `seq` whole and install it in the cache dir; ready(): reads
        can be served now, from the fetched bytes, before the write."""
        path = self.path(seq)
        if os.path.exists(path):
            return
        try:
            data = self.store.get(self.key_of(seq))
            if self._closed:
                return
            marked = self.fetcher.take_mark(seq)
            self.held.add(seq, data, read_ahead=marked)
            if marked:
                with self._lock:
                    self._unread.add(seq)
                    if len(self._unread) > _UNREAD_REMEMBERED:
                        self._unread.clear()
            if ready is not None:
                ready()
            try:
                self._install(seq, data)
            finally:
                if not self.held.installed(seq):  # a read found them damaged meanwhile
                    with self._folder_lock:
                        if not self._closed:
                            self.forget(seq)
        except OSError as e:  # only a cache fill: reads go on remotely
            log.info("could not cache segment %s: %s", self.key_of(seq), e)

    def _install(self, seq: int, data: bytes) -> None:
        """Write a fetched segment into the cache dir (through a .part file,
        so a crash leaves no partial segment under its name), through the
        page cache: a segment fetched ahead and let go from memory before
        its reader got there (lsbd.segments.held) is then read from memory,
        not the disk, and the write does not wait for a disk that the
        reader's other files share.  With O_DIRECT instead, a cold read of
        a tree from a store 10 ms away took 0.16 s longer (median of 14
        runs; docs/distant.md).  The copy is a cache: nothing syncs it."""
        path = self.path(seq)
        with self._folder_lock:
            if self._closed or disk_free(self.folder) < len(data) + self.keep_free:
                return    # a read cache never takes the room writes need
            tmp = path + ".part"
            try:
                # Private to its owner, as a journal is (lsbd.segments.journal).
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    if self.keys is not None:    # never in the clear, even for a moment
                        localfile.write_new(fd, self.keys.new_file(), data)
                    else:
                        view = memoryview(data).cast("B")
                        while view:
                            view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                self._copy_made(seq)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._adopt_locked(seq)

    def close(self) -> None:
        """Stop using the folder.  A fetch still running finds it closed and
        drops what it fetched."""
        self.fetcher.close()
        self.whole_advice.close()
        with self._folder_lock:
            self._closed = True
        self.held.clear()
        with self._lock:
            for seq in list(self._files):
                self._retire_locked(seq)

    def forget_indexes(self) -> None:
        """Drop every parsed index: each is read again on its next use."""
        with self._lock:
            self._indexes.clear()
            self._index_bytes = 0

    def _cached_index(self, seq: int) -> SegmentIndex | None:
        # Without the folder's lock: each OrderedDict call is one step under
        # the GIL, and a reader takes this for every segment of every read.
        idx = self._indexes.get(seq)
        if idx is not None:
            with contextlib.suppress(KeyError):     # dropped meanwhile
                self._indexes.move_to_end(seq)
        return idx

    def _drop_index_locked(self, seq: int) -> None:
        idx = self._indexes.pop(seq, None)
        if idx is not None:
            self._index_bytes -= idx.nbytes

    def _keep_index(self, seq: int, idx: SegmentIndex) -> SegmentIndex:
        with self._lock:
            old = self._indexes.pop(seq, None)
            if old is not None:
                self._index_bytes -= old.nbytes
            self._indexes[seq] = idx
            self._index_bytes += idx.nbytes
            while self._index_bytes > INDEX_CACHE_BYTES and len(self._indexes) > 1:
                self._index_bytes -= self._indexes.popitem(last=False)[1].nbytes
        return idx

    def _index(self, seq: int, load) -> SegmentIndex:
        """The cached index of `seq`, or load() -> (trailer, index bytes) it once.
        Readers that want the same index meanwhile wait for that one load
        (a sequential reader's many requests reach the same thirty segments
        together; each decoding the same index cost a fifth of the first
        read after random writes)."""
        idx = self._cached_index(seq)
        if idx is not None:
            return idx
        with self._lock:
            gate = self._loading.setdefault(seq, threading.Lock())
        try:
            with gate:
                idx = self._cached_index(seq)
                if idx is None:
                    trailer, footer = load()
                    idx = self._keep_index(seq, index_of_footer(
                        footer, trailer, self.block_size, where=self.key_of(seq)))
                return idx
        finally:
            with self._lock:
                if self._loading.get(seq) is gate:
                    del self._loading[seq]

    def _local_index(self, seq: int, f: OpenFile) -> SegmentIndex:
        r = f.reader
        return self._index(seq, lambda: read_sealed_footer_from(r.pread, local_segment_size(r),
                                                                where=self.key_of(seq)))

    def _remote_index(self, seq: int) -> SegmentIndex:
        return self._index(seq, lambda: fetch_footer_by_key(self.store, self.key_of(seq), seq))

