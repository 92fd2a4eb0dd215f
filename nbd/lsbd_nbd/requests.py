"""Requests of the transmission phase: which flags each command may carry
on a connection, the one validation every request passes before it runs,
a request handed to the pool, and a lane of them."""

from __future__ import annotations

from collections import deque

from lsbd.engine.api import MAX_REQUEST
from lsbd_nbd import protocol as p
from lsbd_nbd.handshake import Session

WRITES = frozenset((p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES))


class Pooled:
    """A request handed to the pool, with how many earlier requests it waits
    for (pending) and the requests waiting for it (followers)."""

    __slots__ = ("cmd", "flags", "handle", "offset", "length", "data", "end",
                 "pending", "followers", "tracked")

    def __init__(self, cmd: int, flags: int, handle: int, offset: int, length: int,
                 data: bytes | None):
        self.cmd = cmd
        self.flags = flags
        self.handle = handle
        self.offset = offset
        self.length = length
        self.data = data
        self.end = offset + length
        self.pending = 0
        self.followers: list[Pooled] = []
        self.tracked = False


class Lane:
    """Requests of one connection that run one after another on one pool
    thread (see dispatch.py), in the order they came; `busy` while that
    thread is at work."""

    __slots__ = ("queue", "busy")

    def __init__(self) -> None:
        self.queue: deque[Pooled] = deque()
        self.busy = False


def allowed_flags(session: Session) -> dict[int, int]:
    """Command -> the command flags it may carry on this connection.
    A command missing here is refused with EINVAL."""
    fua = p.CMD_FLAG_FUA if session.flags & p.FLAG_SEND_FUA else 0
    allowed = {
        p.CMD_READ: fua | (p.CMD_FLAG_DF if session.structured else 0),
        p.CMD_WRITE: fua,
        p.CMD_FLUSH: fua,
        p.CMD_TRIM: fua,
        p.CMD_WRITE_ZEROES: fua | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO,
    }
    if session.flags & p.FLAG_SEND_CACHE:
        allowed[p.CMD_CACHE] = 0
    if session.structured and session.base_allocation:
        allowed[p.CMD_BLOCK_STATUS] = fua | p.CMD_FLAG_REQ_ONE
    return allowed


def validate(allowed_by_cmd: dict[int, int], session: Session, cmd: int, flags: int,
             offset: int, length: int) -> tuple[int, str]:
    """(0, "") for a request that may run, else (NBD error, message).
    Every check happens here, once, before the request is dispatched."""
    allowed = allowed_by_cmd.get(cmd)
    if allowed is None:
        return p.EINVAL, f"command {p.CMD_NAMES.get(cmd, cmd)} is not supported"
    if cmd in WRITES and session.flags & p.FLAG_READ_ONLY:
        return p.EPERM, "the export is read-only"
    if flags & ~allowed:
        return p.EINVAL, f"flags {flags:#x} are not valid for {p.CMD_NAMES[cmd]}"
    if cmd == p.CMD_FLUSH:
        if offset or length:
            return p.EINVAL, "FLUSH needs offset and length 0"
        return 0, ""
    if offset + length > session.size:
        err = p.ENOSPC if cmd == p.CMD_WRITE or cmd == p.CMD_WRITE_ZEROES else p.EINVAL
        return err, (f"offset {offset} + length {length} is beyond the export's "
                     f"{session.size} bytes")
    if length > p.MAX_BLOCK and (cmd == p.CMD_READ or cmd == p.CMD_WRITE):
        err = p.EOVERFLOW if flags & p.CMD_FLAG_DF else p.EINVAL
        return err, f"length {length} is above the maximum {p.MAX_BLOCK}"
    if cmd == p.CMD_BLOCK_STATUS and length == 0:
        return p.EINVAL, "BLOCK_STATUS of length 0"
    return 0, ""


def in_chunks(call, offset: int, length: int, fua: bool, extra: dict) -> None:
    # TRIM and WRITE_ZEROES carry no payload and may be up to 4 GiB; the
    # engine takes at most MAX_REQUEST bytes per call.  If a later piece
    # would block, the whole request runs again on the pool: zeroing a
    # range twice is harmless.
    end = offset + length
    while offset < end:
        n = min(end - offset, MAX_REQUEST)
        call(offset, n, fua=fua, **extra)
        offset += n
