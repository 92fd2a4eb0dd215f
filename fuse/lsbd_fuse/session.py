"""One FUSE session: read requests from /dev/fuse, check them, answer them.

Each queue is a thread reading one /dev/fuse fd (the mount's, or a clone of
it); it answers on the fd the request came from.  A request is checked
before it is dispatched: a header of the right length, a body at least as
long as its opcode's structure; anything else gets EINVAL, an opcode we do
not serve ENOSYS, and no request, however malformed, ends the session.

Engine calls are made inline on the queue's thread when the engine promises
they will not block (nowait=True); a call that would block (WouldBlock,
nothing done) and every call that may wait (flush, fsync, a resize) goes to
a pool of worker threads, which answer on the same fd.  So a slow store
fetch holds one worker, not the mount.

The session ends when the kernel does: a read gets ENODEV once the mount is
gone (DESTROY is not sent for a mount like ours, so nothing waits for it).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from lsbd.errors import WouldBlock
from lsbd_fuse import protocol as p
from lsbd_fuse.fs import FuseError, ImageFS
from lsbd_fuse.options import MAX_BACKGROUND, READAHEAD
from lsbd_fuse.workers import WorkerPool

log = logging.getLogger("lsbd.fuse")

#: The largest WRITE (and READ) the kernel sends us: 256 pages, the kernel's
#: own limit (fs.fuse.max_pages_limit).
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
#: Worker threads: engine calls that may wait, in flight at once.
DEFAULT_THREADS = 16

#: What we ask for in INIT, of what the kernel offers:
#: ASYNC_READ, ASYNC_DIO  several reads (direct I/O: reads and writes) of one
#:                        file in flight at once; without ASYNC_DIO random
#:                        4 KiB direct I/O was 12 times slower.
#: BIG_WRITES, MAX_PAGES  requests up to MAX_WRITE, not one page.
#: ATOMIC_O_TRUNC         O_TRUNC arrives with OPEN, where it is refused.
#: PARALLEL_DIROPS        lookups need no lock of ours.
WANTED = (p.ASYNC_READ | p.ASYNC_DIO | p.BIG_WRITES | p.MAX_PAGES | p.ATOMIC_O_TRUNC
          | p.PARALLEL_DIROPS)

#: WRITEs of this size range (whole blocks) are gathered into batches of up
#: to MAX_BATCH while more requests are waiting: small ones are where a call
#: per request costs most.
BATCH_MIN = 4096
BATCH_MAX = 64 * 1024
MAX_BATCH = 64

#: READs larger than this go to the workers without a try on the queue's
#: thread.  A large read spans many runs of blocks; one not in the page
#: cache (RWF_NOWAIT) makes the nowait try give up after reading the runs
#: before it, work the worker then does again, and large reads made in the
#: workers overlap each other's waits.  Measured (fio 1 MiB sequential
#: reads after random writes): the inline try first was 0.5-0.6x the old
#: front end, which made every read in a worker.
INLINE_READ_MAX = 128 * 1024

_HEADER = p.IN_HEADER.size
_READ = struct.Struct("<QQI")         # the part of fuse_read_in we use
_WRITE = struct.Struct("<QQI")        # the part of fuse_write_in we use
_ERROR = p.OUT_HEADER
_Q = struct.Struct("<Q")
_WRITE_OPS = frozenset({p.WRITE, p.FALLOCATE, p.SETATTR, p.FSYNC, p.FLUSH})

Handler = Callable[[int, int, int, memoryview], None]


class Session:
    """Serve `fs` on FUSE fds (`serve_fd` per queue).  `threads` workers.

    `readahead`: the kernel's read-ahead on the files, in bytes.  INIT can
    only lower the kernel's (max_readahead); a larger one is asked of
    `raise_readahead` once INIT is answered, when the kernel has set its
    own."""

    def __init__(self, fs: ImageFS, *, threads: int = DEFAULT_THREADS,
                 max_write: int = MAX_WRITE, readahead: int = READAHEAD,
                 raise_readahead: Callable[[int], None] | None = None) -> None:
        self.fs = fs
        self.max_write = max_write
        self.readahead = readahead
        self.raise_readahead = raise_readahead
        self.pool = WorkerPool(threads)
        self.initialized = False
        self.proto_minor = 0
        #: Set once a queue saw the end of the session (ENODEV, EOF, DESTROY).
        self.ended = threading.Event()
        #: Set when we stop on our own (a signal): data requests get EIO.
        self.stopping = False
        self.fds: list[int] = []
        self._handlers: dict[int, Handler] = {
            p.INIT: self._init,
            p.LOOKUP: self._lookup,
            p.GETATTR: self._getattr,
            p.SETATTR: self._setattr,
            p.OPEN: self._open,
            p.READ: self._read,
            p.WRITE: self._write,
            p.STATFS: self._statfs,
            p.RELEASE: self._release,
            p.FSYNC: self._fsync,
            p.FLUSH: self._flush,
            p.OPENDIR: self._opendir,
            p.READDIR: self._readdir,
            p.RELEASEDIR: self._ok,
            p.FSYNCDIR: self._ok,
            p.ACCESS: self._ok,
            p.FALLOCATE: self._fallocate,
            p.DESTROY: self._destroy,
            p.FORGET: self._no_reply,
            p.BATCH_FORGET: self._no_reply,
            p.INTERRUPT: self._no_reply,
            # What an image file system does not do: no new names, no renames.
            p.CREATE: self._eperm,
            p.MKNOD: self._eperm,
            p.MKDIR: self._eperm,
            p.UNLINK: self._eperm,
            p.RMDIR: self._eperm,
            p.RENAME: self._eperm,
            p.RENAME2: self._eperm,
            p.SYMLINK: self._eperm,
            p.LINK: self._eperm,
            p.TMPFILE: self._eperm,
        }

    # --- the loop of one queue ---------------------------------------------------

    def serve_fd(self, fd: int) -> None:
        """Answer requests read from `fd` until the session ends.

        The fd is read without blocking: while requests are waiting, small
        whole-block WRITEs to one image are gathered and handed to the
        engine together (write_many: one hold of its lock, one system call
        for all), and the batch runs before any other request and whenever
        nothing more is waiting, so requests still take effect in order."""
        buf = bytearray(self.max_write + p.REQUEST_OVERHEAD + _HEADER)
        view = memoryview(buf)
        readv, unpack_header = os.readv, p.IN_HEADER.unpack_from
        handlers, min_body = self._handlers, p.MIN_BODY
        batch_node, unpack_write = self.fs.batch_node, _WRITE.unpack_from
        write_in = _HEADER + p.WRITE_IN.size
        os.set_blocking(fd, False)
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        batch: list[tuple[int, int, bytes]] = []
        node = None
        while True:
            try:
                n = readv(fd, [buf])
            except BlockingIOError:
                if batch:
                    self._run_batch(fd, node, batch)
                    batch = []
                waiter.poll()
                continue
            except OSError as e:
                if e.errno == errno.ENODEV:  # unmounted: the kernel ended the session
                    break
                if e.errno in (errno.EINTR, errno.ENOENT):
                    continue  # ENOENT: a request interrupted before we read it
                log.error("reading /dev/fuse: %s", e)
                break
            if n == 0:  # a socket closed by its peer (tests)
                break
            if n < _HEADER:
                log.warning("a request of %d bytes, shorter than its header: dropped", n)
                if n >= 16:
                    self._error(fd, _Q.unpack_from(buf, 8)[0], errno.EINVAL)
                continue
            length, opcode, unique, nodeid = unpack_header(buf)[:4]
            if opcode == p.WRITE and length == n and BATCH_MIN <= n - write_in <= BATCH_MAX:
                fh, off, size = unpack_write(buf, _HEADER)
                target = batch_node(fh, off, size) if size == n - write_in else None
                if target is not None and not self.stopping:
                    if batch and target is not node:
                        self._run_batch(fd, node, batch)
                        batch = []
                    node = target
                    batch.append((unique, off, bytes(view[write_in:n])))
                    if len(batch) >= MAX_BATCH:
                        self._run_batch(fd, node, batch)
                        batch = []
                    continue
            if batch:
                self._run_batch(fd, node, batch)
                batch = []
            if length != n:
                log.warning("request %d (opcode %d) says %d bytes, %d arrived", unique, opcode,
                            length, n)
                self._error(fd, unique, errno.EINVAL)
                continue
            handler = handlers.get(opcode)
            if handler is None:
                self._error(fd, unique, errno.ENOSYS)
                continue
            if n - _HEADER < min_body.get(opcode, 0):
                log.warning("request %d (opcode %d) too short: %d bytes", unique, opcode, n)
                if opcode not in p.NO_REPLY:
                    self._error(fd, unique, errno.EINVAL)
                continue
            if self.stopping and opcode in _WRITE_OPS:
                self._error(fd, unique, errno.EIO)
                continue
            try:
                handler(fd, unique, nodeid, view[_HEADER:n])
            except FuseError as e:
                self._error(fd, unique, e.errno)
            except Exception:
                log.exception("request %d (opcode %d) failed", unique, opcode)
                self._error(fd, unique, errno.EIO)
        self.ended.set()

    def _run_batch(self, fd: int, node: Any, batch: list[tuple[int, int, bytes]]) -> None:
        """Hand gathered WRITEs to the engine together and answer each; if
        the engine would block or fails, do them one by one instead (each
        inline or in a worker, each with its own answer)."""
        if len(batch) > 1:
            try:
                self.fs.write_many(node, [(off, data) for _u, off, data in batch], True)
            except (WouldBlock, FuseError):
                pass  # nothing was done
            except Exception:
                log.exception("a batch of %d writes failed", len(batch))
            else:
                writev, pack = os.writev, _ERROR.pack
                for unique, _off, data in batch:
                    try:
                        writev(fd, [pack(24, 0, unique), p.WRITE_OUT.pack(len(data), 0)])
                    except OSError as e:
                        self._reply_failed(e, unique)
                return
        for unique, off, data in batch:
            try:
                out = self.fs.write_to(node, off, data, True)
            except WouldBlock:
                self._defer(fd, unique, self.fs.write_to, node, off, data)
            except FuseError as e:
                self._error(fd, unique, e.errno)
            except Exception:
                log.exception("request %d (write) failed", unique)
                self._error(fd, unique, errno.EIO)
            else:
                self._reply(fd, unique, out)

    # --- replies ---------------------------------------------------------------------

    def _reply(self, fd: int, unique: int, data: bytes | bytearray | memoryview = b"") -> None:
        try:
            os.writev(fd, [_ERROR.pack(16 + len(data), 0, unique), data])
        except OSError as e:
            self._reply_failed(e, unique)

    def _error(self, fd: int, unique: int, code: int) -> None:
        try:
            os.write(fd, _ERROR.pack(16, -code, unique))
        except OSError as e:
            self._reply_failed(e, unique)

    def _reply_failed(self, e: OSError, unique: int) -> None:
        # ENOENT: the request was interrupted and the kernel forgot it;
        # ENODEV: the mount is gone.  Neither is an error of ours.
        if e.errno not in (errno.ENOENT, errno.ENODEV):
            log.error("reply to request %d: %s", unique, e)

    def notify_inval_inode(self, inode: int) -> None:
        """Tell the kernel an inode's attributes (its size) changed."""
        if not self.fds or not self.initialized:
            return
        body = p.NOTIFY_INVAL_INODE_OUT.pack(inode, -1, 0)
        try:
            os.writev(self.fds[0], [_ERROR.pack(16 + len(body), p.NOTIFY_INVAL_INODE, 0), body])
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.debug("notify inode %d: %s", inode, e)

    # --- off the loop ----------------------------------------------------------------

    def _defer(self, fd: int, unique: int, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in a worker; its result is the reply's body."""
        self.pool.submit(self._run, fd, unique, fn, args)

    def _run(self, fd: int, unique: int, fn: Callable[..., Any], args: tuple) -> None:
        try:
            result = fn(*args)
        except FuseError as e:
            self._error(fd, unique, e.errno)
        except Exception:
            log.exception("request %d failed", unique)
            self._error(fd, unique, errno.EIO)
        else:
            self._reply(fd, unique, result or b"")

    def close(self) -> None:
        """Wait for the engine calls in flight, then stop the workers."""
        self.pool.close()

    # --- the handlers: decode, call the file system, answer --------------------------

    def _init(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        major, minor, readahead, flags = p.INIT_IN.unpack_from(body)
        if major < p.KERNEL_VERSION or (major == p.KERNEL_VERSION and minor < 31):
            log.error("the kernel speaks FUSE %d.%d; lsbd needs 7.31 or later", major, minor)
            raise FuseError(errno.EPROTO)
        if major > p.KERNEL_VERSION:
            # The kernel asks again with our major (fuse.h: "the kernel will
            # then send a new INIT with the major it supports").
            self._reply(fd, unique, p.INIT_OUT.pack(p.KERNEL_VERSION, p.KERNEL_MINOR_VERSION,
                                                    0, 0, 0, 0, 0, 0, 0, 0, 0))
            return
        self.proto_minor = min(minor, p.KERNEL_MINOR_VERSION)
        granted = flags & WANTED
        log.debug("INIT: kernel %d.%d, flags %#x; granted %#x", major, minor, flags, granted)
        self._reply(fd, unique, p.INIT_OUT.pack(
            p.KERNEL_VERSION, self.proto_minor, min(readahead, self.readahead), granted,
            MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, self.max_write, 1, self.max_write // 4096,
            0, 0))
        self.initialized = True
        # The kernel applied our reply as we wrote it: only now does a larger
        # read-ahead stay.
        if self.readahead > readahead and self.raise_readahead is not None:
            self.raise_readahead(self.readahead)

    def _lookup(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        name = bytes(body).split(b"\0", 1)[0]
        self._reply(fd, unique, self.fs.lookup(nodeid, name))

    def _getattr(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(fd, unique, self.fs.getattr(nodeid))

    def _setattr(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        (valid, _pad, _fh, size, _owner, _atime, mtime, _ctime, _atimensec, mtimensec,
         *_rest) = p.SETATTR_IN.unpack_from(body)
        mtime_ns = None
        if valid & p.FATTR_MTIME_NOW:
            mtime_ns = time.time_ns()
        elif valid & p.FATTR_MTIME:
            mtime_ns = mtime * 1_000_000_000 + mtimensec
        if self.fs.resizes(nodeid, valid, size):
            self._defer(fd, unique, self.fs.setattr, nodeid, valid, size, mtime_ns)
        else:
            self._reply(fd, unique, self.fs.setattr(nodeid, valid, size, mtime_ns))

    def _open(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        flags, _open_flags = p.OPEN_IN.unpack_from(body)
        self._reply(fd, unique, self.fs.open(nodeid, flags))

    def _release(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        self.fs.release(_Q.unpack_from(body)[0])
        self._reply(fd, unique)

    def _read(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        fh, off, size = _READ.unpack_from(body)
        if size > INLINE_READ_MAX:
            self._defer(fd, unique, self.fs.read, fh, off, size)
            return
        try:
            data = self.fs.read(fh, off, size, True)
        except WouldBlock:
            self._defer(fd, unique, self.fs.read, fh, off, size)
            return
        try:
            os.writev(fd, [_ERROR.pack(16 + len(data), 0, unique), data])
        except OSError as e:
            self._reply_failed(e, unique)

    def _write(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        fh, off, size = _WRITE.unpack_from(body)
        start = p.WRITE_IN.size
        if len(body) - start != size:
            log.warning("write request %d: %d bytes of data for a size of %d", unique,
                        len(body) - start, size)
            raise FuseError(errno.EINVAL)
        data = body[start:]
        try:
            out = self.fs.write(fh, off, data, True)
        except WouldBlock:
            # The buffer is the queue's: the worker gets a copy.
            self._defer(fd, unique, self.fs.write, fh, off, bytes(data))
            return
        try:
            os.writev(fd, [_ERROR.pack(24, 0, unique), out])
        except OSError as e:
            self._reply_failed(e, unique)

    def _fallocate(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        fh, off, length, mode, _pad = p.FALLOCATE_IN.unpack_from(body)
        try:
            self.fs.fallocate(fh, off, length, mode, True)
        except WouldBlock:
            self._defer(fd, unique, self.fs.fallocate, fh, off, length, mode)
            return
        self._reply(fd, unique)

    def _flush(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        self._defer(fd, unique, self.fs.flush, _Q.unpack_from(body)[0])

    def _fsync(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        self._defer(fd, unique, self.fs.fsync, _Q.unpack_from(body)[0])

    def _statfs(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(fd, unique, self.fs.statfs())

    def _opendir(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(fd, unique, self.fs.opendir(nodeid))

    def _readdir(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        fh, off, size = _READ.unpack_from(body)
        self._reply(fd, unique, self.fs.readdir(fh, off, size))

    def _ok(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(fd, unique)

    def _eperm(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        raise FuseError(errno.EPERM)

    def _destroy(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(fd, unique)
        self.ended.set()

    def _no_reply(self, fd: int, unique: int, nodeid: int, body: memoryview) -> None:
        # FORGET and BATCH_FORGET: our inodes live as long as the mount.
        # INTERRUPT: an engine call cannot be stopped half-way; the request
        # it names is answered when it is done (the kernel drops that reply
        # if it gave up on it).
        pass
