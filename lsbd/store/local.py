"""`file:///path`: a store in a local directory, one file per object.

Puts are atomic and durable: write a temp file, fsync it, then rename (or
link, for an exclusive create) it into place and fsync the directory.

Its syncs are not lsbd.fileio's: a file:// store stands for a remote store,
whose durability is its own.  fileio holds the cache dir's durable points,
which the power-cut tests replace, and the store must go on answering
through a simulated cut of the cache dir."""

from __future__ import annotations

import errno
import os
import tempfile
from itertools import repeat
from typing import Iterator, Sequence

from lsbd import linux, names, private
from lsbd.errors import ObjectExists, ObjectNotFound, StoreError
from lsbd.store.base import ObjectInfo, Store
from lsbd.store.openfds import Held, OpenObjects

_TMP_PREFIX = ".tmp-"


class LocalStore(Store):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root
        # Segment objects' descriptors, kept open between reads.
        self._kept_open = OpenObjects()
        try:
            private.make_dirs(self.root, fix_existing=False)
        except OSError as e:
            raise StoreError(f"cannot use {self.root} as a store: {e.strerror}", e.errno or errno.EIO) from e

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or (".." in key and ".." in key.split("/")):
            raise ValueError(f"bad object key: {key!r}")
        # Keys are '/'-separated, as are paths here: no join (a read of a
        # few blocks spent a quarter of its time building the path).
        return f"{self.root.rstrip('/')}/{key}"

    def object_file(self, key: str) -> str | None:
        """The file that holds object `key` (it may not exist).  Objects are
        never rewritten in place, so a hard link to one reads as the object."""
        return self._path(key)

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        try:
            self._put(key, data, exclusive=exclusive)
        finally:
            self._kept_open.forget(key)

    def _put(self, key: str, data: bytes, *, exclusive: bool) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            private.make_dirs(directory, fix_existing=False)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if exclusive:
                    # link() fails if the target exists: an atomic conditional create.
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise ObjectExists(key) from None
                else:
                    os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            linux.sync_directory(directory)
        except ObjectExists:
            raise
        except OSError as e:
            raise StoreError(f"put {key}: {e.strerror or e}", e.errno or errno.EIO) from e

    def put_file(self, key: str, path: str, *, exclusive: bool = False,
                 length: int | None = None) -> None:
        """A sealed segment on the same file system becomes the object by a hard
        link: no copy, no second write of the data (the caller fsynced it).
        `path` may be an unnamed file's /proc/PID/fd/N (a sealed object's
        scratch file): the link follows it to the file."""
        try:
            self._put_file(key, path, exclusive=exclusive)
        finally:
            self._kept_open.forget(key)

    def _put_file(self, key: str, path: str, *, exclusive: bool) -> None:
        dest = self._path(key)
        directory = os.path.dirname(dest)
        try:
            private.make_dirs(directory, fix_existing=False)
            if not exclusive and os.path.exists(dest):
                os.unlink(dest)
            _link_following(path, dest)
        except FileExistsError:
            raise ObjectExists(key) from None
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                return super().put_file(key, path, exclusive=exclusive)  # copy instead
            raise StoreError(f"put {key}: {e.strerror or e}", e.errno or errno.EIO) from e
        linux.sync_directory(directory)

    def _acquire(self, key: str) -> tuple[int, Held | None]:
        """A descriptor to read the object by, given back by _release: a
        segment's is the one kept open for its reads (an open costs as much
        as a cold piece's read); any other object's is opened for this read.
        A pair of calls, not a context manager: that cost 0.7 us more a use,
        a third of a cached 4 KiB get (docs/scale.md)."""
        path = self._path(key)
        if names.parse_seq(key) is None:
            return os.open(path, os.O_RDONLY), None
        held = self._kept_open.acquire(key, path)
        return held.fd, held

    def _release(self, fd: int, held: Held | None) -> None:
        """Give back what _acquire gave."""
        if held is None:
            os.close(fd)
        else:
            self._kept_open.release(held)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            fd, held = self._acquire(key)
            try:
                return _read(fd, start, length)
            finally:
                self._release(fd, held)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StoreError(f"get {key}: {e.strerror or e}", e.errno or errno.EIO) from e

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """One descriptor for all the ranges, read by one loop of preads
        made in C: a read after random writes takes a few ranges of each
        stored segment, and each get's way to the descriptor and its
        lookups cost more than its pread (docs/scale.md)."""
        try:
            fd, held = self._acquire(key)
            try:
                got = list(map(os.pread, repeat(fd, len(ranges)),
                               [length for _start, length in ranges],
                               [start for start, _length in ranges]))
                for k, (start, length) in enumerate(ranges):
                    if len(got[k]) != length:      # short: at the end, or a huge range
                        got[k] = _read(fd, start, length)
                return got
            finally:
                self._release(fd, held)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StoreError(f"get {key}: {e.strerror or e}", e.errno or errno.EIO) from e

    def will_need(self, key: str, ranges: list[tuple[int, int | None]]) -> None:
        """Each range advised to the kernel (POSIX_FADV_WILLNEED): it starts
        reading them all now.  Never fails: the get that follows says what
        is wrong."""
        try:
            fd, held = self._acquire(key)
            try:
                size = None
                for start, length in ranges:
                    if start < 0:
                        if size is None:
                            size = os.fstat(fd).st_size
                        start, length = max(0, size + start), None
                    os.posix_fadvise(fd, start, length or 0, os.POSIX_FADV_WILLNEED)
            finally:
                self._release(fd, held)
        except (OSError, ValueError):
            pass

    def head(self, key: str) -> int:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StoreError(f"head {key}: {e.strerror or e}", e.errno or errno.EIO) from e
        if not os.path.isfile(self._path(key)):
            raise ObjectNotFound(key)
        return st.st_size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = []
        # Walk only the directory the prefix names, not the whole store.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = os.path.join(self.root, *base.split("/")) if base else self.root
        for dirpath, _dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = rel + name
                if key.startswith(prefix):
                    try:
                        size = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue  # deleted while we listed
                    found.append(ObjectInfo(key, size))
        found.sort()
        return iter(found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"delete {key}: {e.strerror or e}", e.errno or errno.EIO) from e
        finally:
            self._kept_open.forget(key)
        # Tidy empty directories so a deleted volume leaves nothing behind.
        directory = os.path.dirname(path)
        while directory != self.root:
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)

    def close(self) -> None:
        self._kept_open.close()


def _read(fd: int, start: int, length: int | None) -> bytes:
    """Store.get's range of the open file `fd`."""
    if start < 0:
        if length is not None:
            raise ValueError("a suffix read takes no length")
        size = os.fstat(fd).st_size
        start, length = max(0, size + start), size
    elif length is None:
        length = os.fstat(fd).st_size - start
    if length <= 0:
        return b""
    chunks = []
    while length > 0:  # pread may return less than asked for very large reads
        chunk = os.pread(fd, length, start)
        if not chunk:
            break
        chunks.append(chunk)
        start += len(chunk)
        length -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _link_following(src: str, dest: str) -> None:
    """Hard-link `src` to `dest`, following `src` if it is a symbolic link.
    os.link() calls link(2), which links a /proc/PID/fd/N entry itself (and
    fails across devices, EXDEV); given a directory descriptor it calls
    linkat(2) with AT_SYMLINK_FOLLOW, which links the file it names."""
    fd = os.open(os.path.dirname(dest) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(src, os.path.basename(dest), dst_dir_fd=fd, follow_symlinks=True)
    finally:
        os.close(fd)
