"""The transmission phase of one connection: read requests, validate each
once, run it on the engine, send the reply.

Requests run on the connection's thread or on the server's pool (see
dispatch.py); replies are sent as requests complete, so they may go out in
another order than the requests came.  A request that overlaps a write
still running on the pool waits for that write, so overlapping requests of
one connection take effect in the order they were sent.  Engine exceptions
become NBD errors in errors.nbd_error, nowhere else.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait

from lsbd.errors import WouldBlock
from lsbd_nbd import protocol as p
from lsbd_nbd.dispatch import (POOL_READ_FROM, POOL_WRITE_FROM, READS_AFTER_MISS,
                               READS_AFTER_MISS_IN_TURN, reads_in_turn,
                               takes_nowait)
from lsbd_nbd.errors import Disconnect, ProtocolError, nbd_error
from lsbd_nbd.handshake import Session
from lsbd_nbd.replies import GATHER_ABOVE, Reply, ReplySender
from lsbd_nbd.requests import WRITES, Lane, Pooled, allowed_flags, in_chunks, validate

if TYPE_CHECKING:
    from lsbd_nbd.tls import TLSSocket

log = logging.getLogger("lsbd.nbd")

#: A WRITE longer than MAX_BLOCK is refused; its payload is read and dropped
#: up to this size, beyond it the connection is closed.
MAX_SKIP = 2 * p.MAX_BLOCK
#: One connection stops reading requests while it has this many (or this
#: many bytes of WRITE payload) waiting on the pool.
MAX_IN_POOL = 64
MAX_BYTES_IN_POOL = 256 * 1024 * 1024
#: Requests are read through a buffer of this size (a larger WRITE payload
#: is read on its own).
RECV_BUFFER = 256 * 1024
#: Small block-aligned WRITEs that arrive together are given to the engine
#: together (Volume.write_many: one lock, one system call), up to this many
#: or this many bytes at a time.
MAX_BATCH = 64
MAX_BATCH_BYTES = 1 << 20
class Connection(ReplySender):
    def __init__(self, sock: socket.socket | TLSSocket, session: Session, *,
                 pool: Executor, peer: str = ""):
        self.sock = sock
        self.session = session
        self.device = session.device
        self.nowait = takes_nowait(session.device)
        self.read_only = bool(session.flags & p.FLAG_READ_ONLY)
        self.pool = pool
        self.peer = peer
        self.send_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.changed = threading.Condition(self.state_lock)
        self.in_pool = 0                          # requests handed to the pool, not done
        self.bytes_in_pool = 0                    # WRITE payload bytes those hold
        self.writes_in_pool: list[Pooled] = []   # of those, the writes (for ordering)
        # Large WRITEs, and on a device whose long reads are processor work
        # large READs that missed the inline path: each kind runs in turn on
        # one pool thread (see _to_lane and dispatch.py).
        self.write_lane = Lane()
        self.read_lane = Lane()
        self.reads_in_turn = reads_in_turn(session.device)
        # The read lane's replies go out on a thread of their own while the
        # lane reads the next (_run_sending_behind); made on first use.
        self.sender: ThreadPoolExecutor | None = None
        self.sending: Future | None = None    # the lane's last reply handed to it
        self.broken = False
        self.buf = bytearray(RECV_BUFFER)
        self.pending: list[bytes] = []
        self.large_writes = False     # the last WRITE was larger than buf
        # Inline WRITEs read but not yet given to the engine: (handle, offset,
        # data).  They run before anything else runs or blocks (_run_batch),
        # so requests still take effect in the order they came.
        self.batch: list[tuple[int, int, bytes]] = []
        self.batch_bytes = 0
        self.write_many = getattr(self.device, "write_many", None) if self.nowait else None
        self.block_size = getattr(self.device, "block_size", 0) or 4096
        self._allowed = allowed_flags(session)

    def validate(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """(0, "") for a request that may run, else (NBD error, message)."""
        return validate(self._allowed, self.session, cmd, flags, offset, length)

    # --- the request loop ------------------------------------------------------

    def serve(self) -> None:
        """Serve requests until DISC, EOF or a protocol error; then wait for
        the requests still on the pool and return (the caller closes)."""
        try:
            self._loop()
        finally:
            try:
                self._settle()
            except OSError:
                pass
            with self.changed:
                while self.in_pool:
                    self.changed.wait()
            if self.sender is not None:     # idle now: every reply it had is out
                self.sender.shutdown(wait=False)

    def _loop(self) -> None:
        # The hot path.  Everything it touches per request is a local; READ
        # and WRITE that pass a few cheap checks take a short path, anything
        # else (including every request that is refused) goes through
        # validate() and perform().
        buf = self.buf
        view = memoryview(buf)
        pos = end = 0                 # unparsed input is buf[pos:end]
        pending = self.pending        # inline replies, sent before the next blocking read
        writes_in_pool = self.writes_in_pool   # changed in place, never rebound
        unpack_from = p.REQUEST.unpack_from
        pack_simple = p.SIMPLE_REPLY.pack
        pack_read = p.STRUCTURED_READ_REPLY.pack
        read = self.device.read
        nowait = self.nowait
        structured = self.session.structured
        size = self.session.size
        # The flags READ and WRITE may not carry here (refused in validate).
        read_refused = ~self._allowed[p.CMD_READ]
        write_refused = ~self._allowed[p.CMD_WRITE]
        writable = not self.read_only
        validate = self.validate
        perform = self.perform
        submit = self._submit
        to_lane = self._to_lane
        write_lane = self.write_lane
        # Where a large READ goes when it does not run inline.
        long_read = self._to_read_lane if self.reads_in_turn else submit
        queue_behind = self._queue_behind_overlaps
        request_magic = p.REQUEST_MAGIC
        simple_magic = p.SIMPLE_REPLY_MAGIC
        structured_magic = p.STRUCTURED_REPLY_MAGIC
        done_flag = p.REPLY_FLAG_DONE
        offset_data = p.REPLY_TYPE_OFFSET_DATA
        max_block = p.MAX_BLOCK
        cmd_read = p.CMD_READ
        cmd_write = p.CMD_WRITE
        cmd_disc = p.CMD_DISC
        cmd_flush = p.CMD_FLUSH
        fua_flag = p.CMD_FLAG_FUA
        pool_write_from = POOL_WRITE_FROM
        pool_read_from = POOL_READ_FROM
        cold_reads = 0                # large reads left to send to the pool untried
        after_miss = READS_AFTER_MISS_IN_TURN if self.reads_in_turn else READS_AFTER_MISS
        gather_above = GATHER_ABOVE
        batch = self.batch            # changed in place, never rebound
        run_batch = self._run_batch
        write_inline = self._write_inline
        batching = self.write_many is not None
        block_mask = self.block_size - 1
        while not self.broken:
            if self.in_pool >= MAX_IN_POOL or self.bytes_in_pool >= MAX_BYTES_IN_POOL:
                self._wait_for_pool()
            if end - pos < 28:
                pos, end = self._fill(view, pos, end, 28, between_requests=True)
            magic, flags, cmd, handle, offset, length = unpack_from(buf, pos)
            if magic != request_magic:
                raise ProtocolError(f"bad request magic {magic:#x}")
            pos += 28

            if (cmd == cmd_read and not flags & read_refused and 0 < length <= max_block
                    and offset + length <= size):
                if batch:
                    run_batch()
                if writes_in_pool and queue_behind(cmd, flags, handle, offset, length, None):
                    continue
                if cold_reads and length >= pool_read_from:
                    cold_reads -= 1
                    long_read(Pooled(cmd, flags, handle, offset, length, None))
                    continue
                try:
                    payload = read(offset, length, nowait=True) if nowait else read(offset, length)
                except WouldBlock:
                    if length >= pool_read_from:
                        cold_reads = after_miss
                        long_read(Pooled(cmd, flags, handle, offset, length, None))
                    else:
                        submit(Pooled(cmd, flags, handle, offset, length, None))
                    continue
                except Exception as exc:  # noqa: BLE001 - every error becomes a reply
                    pending.append(self._failure(exc, cmd, flags, handle, offset, length)[0])
                    continue
                if structured:
                    head = pack_read(structured_magic, done_flag, offset_data, handle,
                                     len(payload) + 8, offset)
                else:
                    head = pack_simple(simple_magic, 0, handle)
                if length > gather_above:
                    if pending:
                        self.flush_pending()
                    self.send((head, payload))
                    continue
                pending.append(head)
                pending.append(payload)
                if len(pending) >= 64:
                    self.flush_pending()
                continue

            data = None
            if cmd == cmd_write:
                if length > max_block:
                    pos, end = self._skip(view, pos, end, length)
                elif length > len(buf):
                    data = self._read_large(view, pos, end, length)
                    pos = end = 0
                    self.large_writes = True
                else:
                    if end - pos < length:
                        pos, end = self._fill(view, pos, end, length, between_requests=False)
                    data = view[pos:pos + length].tobytes()
                    pos += length
                    self.large_writes = False
                if (data is not None and writable and not flags & write_refused and length
                        and offset + length <= size):
                    if (batching and length < pool_write_from and not flags & fua_flag
                            and not writes_in_pool and not (offset | length) & block_mask):
                        batch.append((handle, offset, data))
                        self.batch_bytes += length
                        if len(batch) >= MAX_BATCH or self.batch_bytes >= MAX_BATCH_BYTES:
                            run_batch()
                        continue
                    if batch:
                        run_batch()
                    if writes_in_pool and queue_behind(cmd, flags, handle, offset, length, data):
                        continue
                    if flags & fua_flag:
                        submit(Pooled(cmd, flags, handle, offset, length, data))
                        continue
                    if length >= pool_write_from:
                        to_lane(Pooled(cmd, flags, handle, offset, length, data), write_lane)
                        continue
                    write_inline(handle, offset, data)
                    continue
            elif cmd == cmd_disc:
                return

            # Everything else, and every request that is refused.
            if batch:
                run_batch()
            err, message = validate(cmd, flags, offset, length)
            if err:
                pending.append(self.error_reply(flags, handle, err, message)[0])
                continue
            if (writes_in_pool and cmd != cmd_flush
                    and queue_behind(cmd, flags, handle, offset, length, data)):
                continue
            if cmd == cmd_flush or flags & fua_flag:
                submit(Pooled(cmd, flags, handle, offset, length, data))
                continue
            try:
                head, payload = perform(cmd, flags, handle, offset, length, data, nowait=nowait)  # type: ignore[assignment]  # an inline reply always has its head
            except WouldBlock:
                submit(Pooled(cmd, flags, handle, offset, length, data))
                continue
            pending.append(head)
            if payload is not None:
                pending.append(payload)
            if len(pending) >= 64:
                self.flush_pending()

    def _fill(self, view: memoryview, pos: int, end: int, need: int, *,
              between_requests: bool) -> tuple[int, int]:
        """Make buf[0:end] hold at least `need` unparsed bytes (need <= len(buf)).
        Settles what this thread holds first: this is where it may block."""
        self._settle()
        if pos:
            self.buf[:end - pos] = self.buf[pos:end]
            end -= pos
        recv_into = self.sock.recv_into
        # While the client sends large WRITEs, read just the next header, so
        # that its payload comes straight from the socket in one piece.
        limit = need - end if self.large_writes and between_requests else 0
        while end < need:
            n = recv_into(view[end:], limit)
            if not n:
                if between_requests and end == 0:
                    raise Disconnect()
                raise ProtocolError("connection closed in the middle of a request")
            end += n
        return 0, end

    def _read_large(self, view: memoryview, pos: int, end: int, length: int) -> bytes:
        """A WRITE payload larger than the receive buffer: the part already
        buffered, then the rest straight from the socket."""
        self._settle()
        parts = [view[pos:end].tobytes()] if end > pos else []
        missing = length - (end - pos)
        recv = self.sock.recv
        while missing:
            chunk = recv(missing, socket.MSG_WAITALL)
            if not chunk:
                raise ProtocolError("connection closed inside a WRITE payload")
            parts.append(chunk)
            missing -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _wait_for_pool(self) -> None:
        # Back-pressure: stop reading new requests while the pool holds many.
        self._settle()
        with self.changed:
            while self.in_pool >= MAX_IN_POOL or self.bytes_in_pool >= MAX_BYTES_IN_POOL:
                self.changed.wait()

    def _skip(self, view: memoryview, pos: int, end: int, length: int) -> tuple[int, int]:
        """Drop the payload of a WRITE that will be refused."""
        if length > MAX_SKIP:
            raise ProtocolError(f"WRITE of {length} bytes is too large to skip")
        while length:
            if end == pos:
                pos, end = self._fill(view, pos, end, 1, between_requests=False)
            n = min(length, end - pos)
            pos += n
            length -= n
        return pos, end

    # --- inline writes ------------------------------------------------------------

    def _settle(self) -> None:
        """Before this thread blocks: run the batched WRITEs, then send the
        replies of everything run inline."""
        if self.batch:
            self._run_batch()
        if self.pending:
            self.flush_pending()

    def _write_inline(self, handle: int, offset: int, data: bytes) -> None:
        """A validated small WRITE without FUA, on this thread; to the pool if
        the engine would block.  Its reply joins the pending ones."""
        try:
            if self.nowait:
                self.device.write(offset, data, nowait=True)
            else:
                self.device.write(offset, data)
        except WouldBlock:
            self._submit(Pooled(p.CMD_WRITE, 0, handle, offset, len(data), data))
            return
        except Exception as exc:  # noqa: BLE001 - every error becomes a reply
            self.pending.append(self._failure(exc, p.CMD_WRITE, 0, handle, offset,
                                              len(data))[0])
            return
        self.pending.append(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle))
        if len(self.pending) >= 64:
            self.flush_pending()

    def _run_batch(self) -> None:
        """Give the batched WRITEs to the engine in one call.  If it would
        block or fails, it did none of them: they run one at a time, each
        with its own outcome (the pool for the ones that would block)."""
        batch = self.batch
        if not batch:
            return
        writes = [(offset, data) for _handle, offset, data in batch]
        handles = [handle for handle, _offset, _data in batch]
        batch.clear()
        self.batch_bytes = 0
        try:
            self.write_many(writes, nowait=True)  # type: ignore[misc]  # a batch exists only when write_many does
        except Exception:  # noqa: BLE001 - WouldBlock, or errors each write reports itself
            for handle, (offset, data) in zip(handles, writes):
                if self.writes_in_pool and self._queue_behind_overlaps(
                        p.CMD_WRITE, 0, handle, offset, len(data), data):
                    continue
                self._write_inline(handle, offset, data)
            return
        pack, magic = p.SIMPLE_REPLY.pack, p.SIMPLE_REPLY_MAGIC
        self.pending.extend([pack(magic, 0, handle) for handle in handles])
        if len(self.pending) >= 64:
            self.flush_pending()

    # --- the pool ----------------------------------------------------------------

    def _queue_behind_overlaps(self, cmd, flags, handle, offset, length, data) -> bool:
        """If the request overlaps writes still on the pool, queue it behind
        them and return True; else return False (dispatch it as usual)."""
        end = offset + length
        with self.state_lock:
            before = [w for w in self.writes_in_pool if w.offset < end and offset < w.end]
            if not before:
                return False
            req = Pooled(cmd, flags, handle, offset, length, data)
            req.pending = len(before)
            for w in before:
                w.followers.append(req)
            self._register(req)
        return True

    def _register(self, req: Pooled) -> None:
        # Called with state_lock held.
        self.in_pool += 1
        if req.data is not None:
            self.bytes_in_pool += req.length
        if req.cmd in WRITES:
            req.tracked = True
            self.writes_in_pool.append(req)

    def _submit(self, req: Pooled) -> None:
        with self.state_lock:
            self._register(req)
        self.pool.submit(self._run_pooled, req)

    def _to_lane(self, req: Pooled, lane: Lane) -> None:
        """Run a request on the pool after the earlier ones of its lane.
        Large WRITEs: the engine writes one at a time anyway, and more
        threads would only wait for its lock and fight for the GIL (with
        fio's sequential 1 MiB writes, one writer thread per connection made
        about 1000 MiB/s where a thread per write made about 750).  Large
        READs of a device that reads in turn: see dispatch.py."""
        with self.state_lock:
            self._register(req)
            lane.queue.append(req)
            if lane.busy:
                return
            lane.busy = True
        self.pool.submit(self._run_lane, lane)

    def _to_read_lane(self, req: Pooled) -> None:
        self._to_lane(req, self.read_lane)

    def _run_lane(self, lane: Lane) -> None:
        run = self._run_sending_behind if lane is self.read_lane else self._run_pooled
        while True:
            with self.state_lock:
                if not lane.queue:
                    lane.busy = False
                    return
                req = lane.queue.popleft()
            run(req)

    def _run_pooled(self, req: Pooled) -> None:
        try:
            reply = self.perform(req.cmd, req.flags, req.handle, req.offset, req.length,
                                 req.data)
            self._send_quietly(reply)
        finally:
            self._done(req)

    def _run_sending_behind(self, req: Pooled) -> None:
        """A read of the read lane: its reply is handed to the connection's
        sender thread, which sends it while the lane reads the next one.
        The lane is processor work on one thread (dispatch.py), and a 1 MiB
        reply's sendmsg, the kernel copying it into the socket with the GIL
        let go, was a tenth of the lane's time (docs/scale.md,
        "Twenty-second round, second pass"): time the next read waited.
        At most one reply waits for the sender (the lane waits for the one
        before, so a client that reads slowly holds up the lane, as before,
        not the server's memory).  The sender is a thread of its own, never
        the pool's: a lane waiting for a sender queued behind it on a full
        pool would wait for ever.  Replies go out in the order the lane ran
        them; the request counts as done once its reply is out."""
        handed = False
        try:
            reply = self.perform(req.cmd, req.flags, req.handle, req.offset, req.length,
                                 req.data)
            if self.sending is not None:
                wait([self.sending])
            if self.sender is None:
                self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbd-send")
            self.sending = self.sender.submit(self._send_and_done, req, reply)
            handed = True
        finally:
            if not handed:
                self._done(req)

    def _send_and_done(self, req: Pooled, reply: Reply) -> None:
        try:
            self._send_quietly(reply)
        finally:
            self._done(req)

    def _send_quietly(self, reply: Reply) -> None:
        try:
            self.send(reply)
        except OSError:
            pass        # the client is gone; its reader thread sees EOF

    def _done(self, req: Pooled) -> None:
        """A request handed to the pool has run and its reply is sent (or
        the client is gone): release what waits for it."""
        ready = []
        with self.state_lock:
            if req.tracked:
                self.writes_in_pool.remove(req)
            for follower in req.followers:
                follower.pending -= 1
                if follower.pending == 0:
                    ready.append(follower)
            self.in_pool -= 1
            if req.cmd == p.CMD_WRITE:
                self.bytes_in_pool -= req.length
            self.changed.notify_all()
        for follower in ready:
            self.pool.submit(self._run_pooled, follower)

    # --- running one request ----------------------------------------------------

    def perform(self, cmd: int, flags: int, handle: int, offset: int, length: int,
                data: bytes | None, *, nowait: bool = False) -> Reply:
        """Run one validated request on the engine; return its reply.
        nowait=True (only for a device that takes it): WouldBlock comes out
        as is, for the caller to run the request again on the pool."""
        device = self.device
        try:
            if cmd == p.CMD_READ:
                return self.read_reply(handle, offset, device.read(offset, length) if length else b"")
            fua = bool(flags & p.CMD_FLAG_FUA)
            extra = {"nowait": True} if nowait else {}
            if cmd == p.CMD_WRITE:
                if length:
                    device.write(offset, data, fua=fua, **extra)  # type: ignore[arg-type]  # a WRITE always carries its data
            elif cmd == p.CMD_FLUSH:
                if not self.read_only:       # nothing to make durable otherwise
                    device.flush()
            elif cmd == p.CMD_WRITE_ZEROES:
                # lsbd stores zeroes as map entries, never as data, and a
                # later write to a zeroed range costs the same as to any
                # other range (every write is appended to the log): so the
                # zeroing is fast (FAST_ZERO succeeds) and NO_HOLE needs
                # nothing more than the same zeroing.
                in_chunks(device.write_zeroes, offset, length, fua, extra)
            elif cmd == p.CMD_TRIM:
                in_chunks(device.trim, offset, length, fua, extra)
            elif cmd == p.CMD_BLOCK_STATUS:
                return self.block_status_reply(handle, flags, offset, length)
            elif cmd == p.CMD_CACHE:
                if nowait:      # it fetches from the store: on the pool
                    raise WouldBlock("CACHE waits for the store")
                # Replies once the blocks are in the local cache.
                device.prefetch(offset, length)  # type: ignore[attr-defined]  # only advertised when the device has it
            return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle), None
        except Exception as exc:
            if nowait and isinstance(exc, WouldBlock):
                raise
            return self._failure(exc, cmd, flags, handle, offset, length)

    def _failure(self, exc: Exception, cmd: int, flags: int, handle: int, offset: int,
                 length: int) -> Reply:
        """The error reply for an engine exception, logged if it is worth it."""
        err, worth_logging = nbd_error(exc)
        if worth_logging:
            log.error("%s: %s offset=%d length=%d on export %r failed: %s", self.peer,
                      p.CMD_NAMES.get(cmd, cmd), offset, length, self.session.export_name,
                      exc, exc_info=not isinstance(exc, OSError))
        return self.error_reply(flags, handle, err, str(exc) or type(exc).__name__)

