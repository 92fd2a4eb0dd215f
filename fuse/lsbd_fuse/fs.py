"""The FUSE operations: translate kernel requests into BlockDevice calls.

The file system is a root directory holding image files (``VOLUME.img`` and,
read-only, ``snapshots/NAME.img``), each a regular file exactly as large as its
device.  Nothing here stores data or decides anything about it: reads, writes and
flushes go straight to the engine, and engine errors become errno values in
`errmap`.

Engine calls may block (a read may wait for a ranged GET from the store).
Reads and writes of a device that can say so (`supports_nowait`) are first
made right on the trio loop with nowait=True: most only touch local files,
and handing them to a thread and back costs more than the call itself.  A
call that would block (WouldBlock: nothing was done) goes to a fixed pool of
worker threads (`workers`), as does every call of a device without that
promise, every flush and every resize: a slow fetch holds one thread, not
the whole mount.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pyfuse3

from lsbd.engine.api import MAX_REQUEST
from lsbd.errors import WouldBlock
from lsbd_fuse.errmap import errno_for
from lsbd_fuse.tree import Dir, File, Image, Tree
from lsbd_fuse.workers import WorkerPool

log = logging.getLogger("lsbd.fuse")

T = TypeVar("T")

#: Engine calls in flight at once (the worker threads).  Enough for a loop
#: device or fio at iodepth 16 to keep the store busy; more only adds threads.
DEFAULT_THREADS = 16

#: The kernel may cache names and attributes this long.  Only this process
#: changes an image's size (through setattr, whose reply updates the kernel at
#: once), so a long timeout costs nothing and saves a GETATTR per request.
ATTR_TIMEOUT = 60.0

#: st_blksize: tools that size their I/O by it (cp, stdio) then issue requests
#: that each fill one FUSE request (the kernel's max_write, 1 MiB here).
PREFERRED_IO = 1024 * 1024


class ImageFS(pyfuse3.Operations):
    """A read/write view of one or more block devices as image files.

    `images` maps a path inside the mount ("VOL.img", "snapshots/a.img") to an
    `Image` (the device and a read-only flag).  `direct_io` selects the cache
    mode; see `lsbd_fuse.options` for why it is on by default.
    """

    def __init__(self, images: Mapping[str, Image], *, direct_io: bool = True,
                 threads: int = DEFAULT_THREADS) -> None:
        super().__init__()
        self.tree = Tree()
        for path, image in images.items():
            self.tree.add(path, image)
        self.direct_io = direct_io
        self._threads = threads
        self._pool: WorkerPool | None = None
        self._handles: dict[int, tuple[File, bool]] = {}
        self._next_fh = 1
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._mounted = False

    # --- the hook for more images (snapshots) --------------------------------

    def add_image(self, path: str, image: Image) -> None:
        """Show another image (e.g. a snapshot) in the mounted tree."""
        # Nothing to invalidate: failed lookups are not cached (no negative
        # entries are ever returned) and readdir is not cached.
        self.tree.add(path, image)

    def remove_image(self, path: str) -> Image:
        """Hide an image; open handles keep working until they are closed."""
        node = self.tree.remove(path)
        if self._mounted:
            name = path.rstrip("/").rsplit("/", 1)[-1].encode()
            pyfuse3.invalidate_entry_async(node.parent, name, ignore_enoent=True)
        return node.image

    # --- helpers ---------------------------------------------------------------

    def init(self) -> None:
        self._mounted = True

    async def _engine(self, op: str, node: File, fn: Callable[..., T], *args: Any,
                      span: tuple[int, int] | None = None) -> T:
        """Run a blocking engine call in a worker thread; errors become FUSEError.

        `op`, `node` and `span` (offset, length) only name the request in the
        log if it fails: nothing is formatted on the fast path."""
        if self._pool is None:
            self._pool = WorkerPool(self._threads)
        try:
            return await self._pool.run(fn, *args)
        except Exception as e:  # noqa: BLE001 - every error must become an errno
            raise _fuse_error(e, op, node, span) from None

    def stop_workers(self) -> None:
        """After the FUSE loop has ended: stop the worker threads."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _node(self, inode: int) -> Dir | File:
        try:
            return self.tree.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _file(self, fh: int) -> tuple[File, bool]:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _attrs(self, node: Dir | File) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_rdev = 0
        a.st_blksize = PREFERRED_IO
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        if isinstance(node, Dir):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2 + sum(isinstance(self.tree.nodes[i], Dir)
                                 for i in node.children.values())
            a.st_size = 0
            a.st_blocks = 0
        else:
            a.st_mode = stat.S_IFREG | (0o444 if node.read_only else 0o644)
            a.st_nlink = 1
            a.st_size = node.size
            a.st_blocks = node.size // 512
        return a

    # --- names and attributes --------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not isinstance(parent, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(self._node(parent.parent))
        inode = parent.children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self._node(inode))

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            # Mode and owner come from the mount; there is nowhere to keep them.
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size:
            if not isinstance(node, File):
                raise pyfuse3.FUSEError(errno.EISDIR)
            await self._resize(node, attr.st_size)
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        return self._attrs(node)

    async def _resize(self, node: File, new_size: int) -> None:
        if new_size == node.size:
            return
        if new_size < node.size:
            # `dd` without conv=notrunc, `> file` or `truncate -s` smaller would
            # wipe or cut the disk: an image only grows.
            log.warning("refusing to shrink %s from %d to %d bytes (volumes only grow; "
                        "use conv=notrunc with dd)", node.name, node.size, new_size)
            raise pyfuse3.FUSEError(errno.EINVAL)
        if node.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        dev = node.image.device
        await self._engine("resize", node, dev.resize, new_size)
        node.size = await self._engine("size", node, lambda: dev.size)
        node.mtime_ns = time.time_ns()
        log.info("grew %s to %d bytes", node.name, node.size)

    # --- directories -------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        if not isinstance(self._node(inode), Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        node = self._node(fh)
        assert isinstance(node, Dir)
        entries = sorted(node.children.items())
        for i, (name, inode) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attrs(self._node(inode)), i):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        files = self.tree.files()
        s.f_bsize = PREFERRED_IO
        s.f_frsize = 4096
        s.f_blocks = sum(f.size for f in files) // s.f_frsize
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- opening -------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and node.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            # The kernel hands O_TRUNC to open (atomic_o_trunc): honouring it
            # would erase the whole disk.  dd needs conv=notrunc.
            log.warning("refusing to open %s with O_TRUNC: it would erase the volume "
                        "(use dd conv=notrunc)", node.name)
            raise pyfuse3.FUSEError(errno.EINVAL)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = (node, writable)
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=not self.direct_io)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # --- data ------------------------------------------------------------------------

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node, _ = self._file(fh)
        length = min(size, node.size - off, MAX_REQUEST)
        if length <= 0:
            return b""  # at or past the end: EOF, as for any file
        dev = node.image.device
        if node.nowait:
            data = _nowait("read", node, (off, length), dev.read, off, length)
            if data is not _BLOCKED:
                return data
        return await self._engine("read", node, dev.read, off, length, span=(off, length))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node, _ = self._file(fh)
        if node.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        room = node.size - off
        if room <= 0:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # a disk does not grow by writing past its end
        if len(buf) > room:
            buf = buf[:room]  # a short write, then ENOSPC on the next one
        dev = node.image.device
        if (not node.nowait
                or _nowait("write", node, (off, len(buf)), dev.write, off, buf) is _BLOCKED):
            await self._engine("write", node, dev.write, off, buf, span=(off, len(buf)))
        node.mtime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        # close(2): make what this handle wrote durable, so a crash right after
        # a `cp`/`dd` without fsync does not lose it.  Readers skip the cost.
        node, writable = self._file(fh)
        if writable:
            await self._engine("flush", node, node.image.device.flush)

    async def fsync(self, fh: int, datasync: bool) -> None:
        node, _ = self._file(fh)
        await self._engine("fsync", node, node.image.device.flush)

    # --- what an image file system does not do -----------------------------------

    async def _no(self, *args: Any, **kw: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mkdir = mknod = unlink = rmdir = rename = symlink = link = _no  # type: ignore[assignment]

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def forget(self, inode_list: Any) -> None:
        pass


#: What _nowait returns when the call would block (no engine call returns it).
_BLOCKED = object()


def _nowait(op: str, node: File, span: tuple[int, int], fn: Callable[..., T],
            *args: Any) -> T | object:
    """fn(*args, nowait=True), right here on the loop; _BLOCKED if the engine
    says it would have to wait (it then did nothing: retry it in a worker)."""
    try:
        return fn(*args, nowait=True)
    except WouldBlock:
        return _BLOCKED
    except Exception as e:  # noqa: BLE001 - every error must become an errno
        raise _fuse_error(e, op, node, span) from None


def _fuse_error(e: Exception, op: str, node: File, span: tuple[int, int] | None) -> pyfuse3.FUSEError:
    """The errno for an engine error; `op`, `node` and `span` name the request
    in the log, formatted only here, off the fast path."""
    what = f"{op} {node.name}" + (f" at {span[0]}+{span[1]}" if span else "")
    return pyfuse3.FUSEError(errno_for(e, what))
