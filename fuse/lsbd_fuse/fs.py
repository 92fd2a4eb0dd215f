"""The file system's operations: image files over block devices.

The file system is a root directory holding image files (``VOLUME.img`` and,
read-only, ``snapshots/NAME.img``), each a regular file exactly as large as its
device.  Nothing here stores data or decides anything about it: reads, writes,
zeroing, discards and flushes go straight to the engine, and engine errors
become errno values in `errmap`.  Each method takes decoded arguments and
returns the reply's body (see `protocol`), or raises FuseError.

Data calls (read, write, fallocate) take `nowait`: with nowait=True they
either complete without waiting (the engine's promise, for a device with
`supports_nowait`) or raise WouldBlock having done nothing, and the caller
repeats them where blocking is fine.  The calls that may always wait
(flush, fsync, a growing setattr: see `resizes`) are for the caller to run
off the queue's thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Mapping

from lsbd.engine.api import MAX_REQUEST
from lsbd.errors import WouldBlock
from lsbd_fuse import protocol as p
from lsbd_fuse.errmap import errno_for
from lsbd_fuse.tree import ROOT_INODE, Dir, File, Image, Tree

log = logging.getLogger("lsbd.fuse")

#: The kernel may cache names and attributes this long.  A size changed by
#: another path (`lsbd resize` through the running writer) is also pushed to
#: the kernel at once (FUSE_NOTIFY_INVAL_INODE, see `session`); the short
#: timeout is the fallback where a notification cannot be sent.
ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 60.0

#: st_blksize of the images: tools that size their I/O by it (cp, stdio) then
#: fill one FUSE request each (max_write, 1 MiB).
PREFERRED_IO = 1024 * 1024
#: f_bsize of statfs: a loop device over an image takes it as its discard
#: granularity, so it is the engine's block size, not PREFERRED_IO.
FS_BLOCK = 4096

_WHOLE = ATTR_TIMEOUT.__trunc__()
_FRAC = int((ATTR_TIMEOUT - _WHOLE) * 1e9)
_ENTRY = int(ENTRY_TIMEOUT)


class FuseError(Exception):
    """Answer the request with this errno."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.errno = code


class ImageFS:
    """A read/write view of block devices as image files.

    `images` maps a path inside the mount ("VOL.img", "snapshots/a.img") to an
    `Image` (the device and a read-only flag).  `direct_io` selects the cache
    mode; see `lsbd_fuse.options` for why it is off by default.
    """

    def __init__(self, images: Mapping[str, Image], *, direct_io: bool = False) -> None:
        self.tree = Tree()
        for path, image in images.items():
            self.tree.add(path, image)
        # Without FOPEN_KEEP_CACHE: every open starts from the engine's data.
        self.open_flags = p.FOPEN_PARALLEL_DIRECT_WRITES | (p.FOPEN_DIRECT_IO if direct_io else 0)
        self._handles: dict[int, tuple[File, bool]] = {}
        self._next_fh = 1
        self._lock = threading.Lock()  # handles and sizes change from several threads
        self._uid = os.getuid()
        self._gid = os.getgid()

    # --- the set of images -----------------------------------------------------

    def add_image(self, path: str, image: Image) -> None:
        """Show another image (e.g. a snapshot) in the mounted tree.  No
        kernel cache to clear: failed lookups are never cached."""
        self.tree.add(path, image)

    def remove_image(self, path: str) -> Image:
        """Hide an image; open handles keep working until they are closed."""
        return self.tree.remove(path).image

    def changed_sizes(self) -> list[File]:
        """Images whose device grew by another path (a resize through the
        running writer) since the last call; their cached size is updated."""
        changed = []
        for node in self.tree.files():
            try:
                size = node.image.device.size
            except Exception:  # noqa: BLE001 - a closed device keeps its last size
                continue
            if size != node.size:
                node.size = size
                node.mtime_ns = time.time_ns()
                changed.append(node)
        return changed

    # --- helpers ---------------------------------------------------------------

    def _node(self, inode: int) -> Dir | File:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise FuseError(errno.ENOENT)
        return node

    def _file(self, fh: int) -> tuple[File, bool]:
        handle = self._handles.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        return handle

    def _attr(self, node: Dir | File) -> tuple:
        """The fields of a fuse_attr, in order."""
        sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
        if isinstance(node, Dir):
            mode = stat.S_IFDIR | 0o755
            nlink = 2 + sum(isinstance(self.tree.nodes.get(i), Dir)
                            for i in node.children.values())
            size = 0
        else:
            mode = stat.S_IFREG | (0o444 if node.read_only else 0o644)
            nlink = 1
            size = node.size
        return (node.inode, size, size // 512, sec, sec, sec, nsec, nsec, nsec, mode, nlink,
                self._uid, self._gid, 0, PREFERRED_IO, 0)

    def _entry(self, node: Dir | File) -> bytes:
        return p.ENTRY_OUT.pack(node.inode, 0, _ENTRY, _WHOLE, 0, _FRAC, *self._attr(node))

    def attr_out(self, node: Dir | File) -> bytes:
        return p.ATTR_OUT.pack(_WHOLE, _FRAC, 0, *self._attr(node))

    # --- names and attributes --------------------------------------------------

    def lookup(self, parent_inode: int, name: bytes) -> bytes:
        parent = self._node(parent_inode)
        if not isinstance(parent, Dir):
            raise FuseError(errno.ENOTDIR)
        if name == b".":
            return self._entry(parent)
        if name == b"..":
            return self._entry(self._node(parent.parent))
        inode = parent.children.get(name)
        if inode is None:
            raise FuseError(errno.ENOENT)
        return self._entry(self._node(inode))

    def getattr(self, inode: int) -> bytes:
        return self.attr_out(self._node(inode))

    def setattr(self, inode: int, valid: int, size: int, mtime_ns: int | None) -> bytes:
        """Mode and owner: EPERM (they come from the mount); size: grow the
        volume (may wait: call off the loop when `resizes`); times: kept in
        memory."""
        node = self._node(inode)
        if valid & (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID):
            raise FuseError(errno.EPERM)
        if valid & p.FATTR_SIZE:
            if not isinstance(node, File):
                raise FuseError(errno.EISDIR)
            self._resize(node, size)
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        return self.attr_out(node)

    def resizes(self, inode: int, valid: int, size: int) -> bool:
        """Whether a setattr would call the engine (and so may wait)."""
        node = self.tree.nodes.get(inode)
        return bool(valid & p.FATTR_SIZE) and isinstance(node, File) and size > node.size

    def _resize(self, node: File, new_size: int) -> None:
        if new_size == node.size:
            return
        if new_size < node.size:
            # `dd` without conv=notrunc, `> file` or `truncate -s` smaller would
            # wipe or cut the disk: an image only grows.
            log.warning("refusing to shrink %s from %d to %d bytes (volumes only grow; "
                        "use conv=notrunc with dd)", node.name, node.size, new_size)
            raise FuseError(errno.EINVAL)
        if node.read_only:
            raise FuseError(errno.EROFS)
        dev = node.image.device
        try:
            dev.resize(new_size)
            size = dev.size
        except Exception as e:  # noqa: BLE001 - every error must become an errno
            raise FuseError(errno_for(e, f"resize {node.name} to {new_size}")) from None
        node.size = size
        node.mtime_ns = time.time_ns()
        log.info("grew %s to %d bytes", node.name, size)

    def statfs(self) -> bytes:
        files = self.tree.files()
        blocks = sum(f.size for f in files) // FS_BLOCK
        return p.STATFS_OUT.pack(blocks, 0, 0, len(self.tree.nodes), 0, FS_BLOCK, 255, FS_BLOCK, 0)

    # --- directories -----------------------------------------------------------

    def opendir(self, inode: int) -> bytes:
        if not isinstance(self._node(inode), Dir):
            raise FuseError(errno.ENOTDIR)
        return p.OPEN_OUT.pack(inode, 0, 0)

    def readdir(self, inode: int, offset: int, size: int) -> bytes:
        node = self._node(inode)
        if not isinstance(node, Dir):
            raise FuseError(errno.ENOTDIR)
        out = bytearray()
        for i, (name, child) in enumerate(sorted(node.children.items())[offset:], offset + 1):
            kind = stat.S_IFDIR if isinstance(self.tree.nodes.get(child), Dir) else stat.S_IFREG
            record = p.dirent(child, i, name, kind >> 12)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    # --- opening ---------------------------------------------------------------

    def open(self, inode: int, flags: int) -> bytes:
        node = self._node(inode)
        if isinstance(node, Dir):
            raise FuseError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and node.read_only:
            raise FuseError(errno.EROFS)
        if flags & os.O_TRUNC:
            # The kernel hands O_TRUNC to open (ATOMIC_O_TRUNC): honouring it
            # would erase the whole disk.  dd needs conv=notrunc.
            log.warning("refusing to open %s with O_TRUNC: it would erase the volume "
                        "(use dd conv=notrunc)", node.name)
            raise FuseError(errno.EINVAL)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = (node, writable)
        return p.OPEN_OUT.pack(fh, self.open_flags, 0)

    def release(self, fh: int) -> None:
        with self._lock:
            self._handles.pop(fh, None)

    # --- data --------------------------------------------------------------------

    def read(self, fh: int, off: int, size: int, nowait: bool = False) -> bytes:
        node = self._file(fh)[0]
        length = min(size, node.size - off, MAX_REQUEST)
        if length <= 0:
            return b""  # at or past the end: EOF, as for any file
        if nowait and not node.nowait:
            raise WouldBlock("this device makes no promise not to block")
        try:
            return node.image.device.read(off, length, nowait=True) if nowait else \
                node.image.device.read(off, length)
        except WouldBlock:
            raise
        except Exception as e:  # noqa: BLE001 - every error must become an errno
            raise FuseError(errno_for(e, f"read {node.name} at {off}+{length}")) from None

    def write(self, fh: int, off: int, data: bytes | memoryview, nowait: bool = False) -> bytes:
        node, writable = self._file(fh)
        if node.read_only or not writable:
            raise FuseError(errno.EROFS if node.read_only else errno.EBADF)
        return self.write_to(node, off, data, nowait)

    def write_to(self, node: File, off: int, data: bytes | memoryview,
                 nowait: bool = False) -> bytes:
        room = node.size - off
        if room <= 0:
            raise FuseError(errno.ENOSPC)  # a disk does not grow by writing past its end
        if len(data) > room:
            data = data[:room]  # a short write, then ENOSPC on the next one
        if nowait and not node.nowait:
            raise WouldBlock("this device makes no promise not to block")
        try:
            if nowait:
                node.image.device.write(off, data, nowait=True)
            else:
                node.image.device.write(off, data)
        except WouldBlock:
            raise
        except Exception as e:  # noqa: BLE001
            raise FuseError(errno_for(e, f"write {node.name} at {off}+{len(data)}")) from None
        return p.WRITE_OUT.pack(len(data), 0)

    def batch_node(self, fh: int, off: int, size: int) -> File | None:
        """The image a WRITE may join a batch for (`write_many`): whole
        blocks inside the image, writable, on a device that batches; else
        None (write it on its own)."""
        handle = self._handles.get(fh)
        if handle is None or not handle[1]:
            return None
        node = handle[0]
        bs = node.block_size
        if (node.write_many is None or node.read_only or off % bs or size % bs or not size
                or off + size > node.size):
            return None
        return node

    def write_many(self, node: File, writes: list[tuple[int, bytes]],
                   nowait: bool = False) -> None:
        """Whole-block writes in order, all or none (the engine's write_many)."""
        try:
            node.write_many(writes, nowait=nowait)  # type: ignore[misc]
        except WouldBlock:
            raise
        except Exception as e:  # noqa: BLE001
            raise FuseError(errno_for(e, f"write {node.name}: {len(writes)} writes from "
                                         f"{writes[0][0]}")) from None

    def fallocate(self, fh: int, off: int, length: int, mode: int, nowait: bool = False) -> None:
        """PUNCH_HOLE|KEEP_SIZE (discard, fstrim): engine trim.  ZERO_RANGE,
        with or without KEEP_SIZE (a loop device's WRITE_ZEROES): engine
        write_zeroes.  Plain allocation inside the image: nothing to do (a
        volume has no space to reserve).  Anything that would change the size
        or move data: EOPNOTSUPP."""
        node, writable = self._file(fh)
        if node.read_only or not writable:
            raise FuseError(errno.EROFS if node.read_only else errno.EBADF)
        if off < 0 or length <= 0:
            raise FuseError(errno.EINVAL)
        end = off + length
        keep = mode & p.FALLOC_FL_KEEP_SIZE
        if end > node.size and not keep:
            raise FuseError(errno.ENOSPC)  # the image would have to grow
        end = min(end, node.size)
        what = mode & ~p.FALLOC_FL_KEEP_SIZE
        if what == p.FALLOC_FL_PUNCH_HOLE and keep:
            call = node.image.device.trim
        elif what == p.FALLOC_FL_ZERO_RANGE:
            call = node.image.device.write_zeroes
        elif what == 0:
            return
        else:
            raise FuseError(errno.EOPNOTSUPP)
        if end <= off:
            return  # entirely past the end
        if nowait and not node.nowait:
            raise WouldBlock("this device makes no promise not to block")
        try:
            if nowait:
                call(off, end - off, nowait=True)
            else:
                call(off, end - off)
        except WouldBlock:
            raise
        except Exception as e:  # noqa: BLE001
            raise FuseError(errno_for(e, f"fallocate {node.name} mode {mode:#x} at "
                                         f"{off}+{end - off}")) from None

    def flush(self, fh: int) -> None:
        """close(2): make what this handle wrote durable, so a crash right
        after a `cp`/`dd` without fsync does not lose it.  Readers skip it."""
        node, writable = self._file(fh)
        if writable:
            self._flush(node, "flush")

    def fsync(self, fh: int) -> None:
        self._flush(self._file(fh)[0], "fsync")

    def _flush(self, node: File, op: str) -> None:
        try:
            node.image.device.flush()
        except Exception as e:  # noqa: BLE001
            raise FuseError(errno_for(e, f"{op} {node.name}")) from None


__all__ = ["ImageFS", "FuseError", "ROOT_INODE", "Image"]
