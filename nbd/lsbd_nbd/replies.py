"""Replies of the transmission phase: building them (read, error, block
status) and sending them whole, from any thread."""

from __future__ import annotations

import socket
import struct
import threading
from typing import TYPE_CHECKING

from lsbd.engine.api import MAX_REQUEST, BlockDevice
from lsbd_nbd import protocol as p
from lsbd_nbd.handshake import Session

if TYPE_CHECKING:
    from lsbd_nbd.tls import TLSSocket

#: The largest range one BLOCK_STATUS reply covers (asked of the engine in
#: MAX_REQUEST pieces), and the most descriptors one reply carries (the
#: client asks again for the rest).
MAX_STATUS_LENGTH = 1 << 30
MAX_STATUS_DESCRIPTORS = 1 << 14
#: Replies with a payload above this size go out with sendmsg (no copy).
GATHER_ABOVE = 64 * 1024
#: Longest error message sent in a structured error chunk.
_MAX_MESSAGE = 512

# A reply: a header, and a payload to send after it (or None).
Reply = tuple[bytes, "bytes | None"]


class ReplySender:
    """The reply half of a Connection: it holds the session, the device, the
    socket, the lock that keeps replies whole and the queue of inline replies."""

    session: Session
    device: BlockDevice
    sock: socket.socket | TLSSocket
    send_lock: threading.Lock
    pending: list[bytes]
    broken: bool

    def read_reply(self, handle: int, offset: int, payload: bytes) -> Reply:
        if not self.session.structured:
            return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle), payload
        if not payload:
            return p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                           p.REPLY_TYPE_NONE, handle, 0), None
        return p.STRUCTURED_READ_REPLY.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, handle,
            len(payload) + 8, offset), payload

    def error_reply(self, flags: int, handle: int, err: int, message: str) -> Reply:
        if not self.session.structured:
            return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, err, handle), None
        raw = message.encode("utf-8", "replace")[:_MAX_MESSAGE]
        return p.STRUCTURED_ERROR_REPLY.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, handle,
            6 + len(raw), err, len(raw)) + raw, None

    def block_status_reply(self, handle: int, flags: int, offset: int, length: int) -> Reply:
        limit = 1 if flags & p.CMD_FLAG_REQ_ONE else MAX_STATUS_DESCRIPTORS
        hole = p.STATE_HOLE | p.STATE_ZERO
        words = [p.META_BASE_ALLOCATION_ID]
        pos = offset
        end = offset + min(length, MAX_STATUS_LENGTH)
        while pos < end and len(words) <= 2 * limit:
            # The engine answers for at most MAX_REQUEST bytes per call.
            for run in self.device.allocation(pos, min(end - pos, MAX_REQUEST)):
                if run.offset != pos or run.length <= 0:
                    raise RuntimeError(f"engine allocation map is not contiguous at {pos}")
                status = 0 if run.allocated else hole
                if len(words) > 1 and words[-1] == status:
                    words[-2] += run.length
                elif len(words) > 2 * limit:
                    break
                else:
                    words.append(run.length)
                    words.append(status)
                pos += run.length
            if limit == 1:
                break
        if len(words) == 1:
            raise RuntimeError("engine allocation map is empty")
        if limit == 1:
            words[1] = min(words[1], length)
        payload = struct.pack(f">{len(words)}I", *words)
        return p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                       p.REPLY_TYPE_BLOCK_STATUS, handle,
                                       len(payload)) + payload, None

    def flush_pending(self) -> None:
        """Send the replies of inline requests, queued so that one system call
        carries all the replies to one batch of pipelined requests."""
        pending = self.pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self.send((data, None))

    def send(self, reply: Reply) -> None:
        """Send one reply whole (replies from several threads never interleave).
        A failure means the client is gone: the connection is marked broken
        and its socket shut down, so the reading thread stops too."""
        head, payload = reply
        try:
            with self.send_lock:
                if payload is None:
                    self.sock.sendall(head)
                elif len(payload) <= GATHER_ABOVE:
                    self.sock.sendall(head + payload)
                else:
                    sent = self.sock.sendmsg([head, payload])
                    if sent < len(head):
                        self.sock.sendall(head[sent:])
                        sent = len(head)
                    if sent - len(head) < len(payload):
                        self.sock.sendall(memoryview(payload)[sent - len(head):])
        except OSError:
            self.broken = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise
