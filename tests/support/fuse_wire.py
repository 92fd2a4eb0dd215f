"""Drive a FUSE session over a socket pair, as the kernel would over /dev/fuse.

A SOCK_SEQPACKET pair keeps message boundaries: each request is one message
(one read of /dev/fuse for the server), each reply one message (one write).
`Wire` sends requests, collects replies by their unique id, and checks that
requests that must not be answered are not.
"""

from __future__ import annotations

import os
import socket
import threading

from lsbd_fuse import protocol as p
from lsbd_fuse.session import Session


class Wire:
    def __init__(self, session: Session, *, init: bool = True, start: bool = True) -> None:
        self.session = session
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.theirs = theirs
        session.fds = [theirs.fileno()]
        self.thread = threading.Thread(target=session.serve_fd, args=(theirs.fileno(),),
                                       name="queue", daemon=True)
        if start:
            self.thread.start()
        self.unique = 0
        self.replies: dict[int, tuple[int, bytes]] = {}
        self.extra: list[bytes] = []  # replies to no request we sent (notifications)
        if init:
            err, body = self.call(p.INIT, 0, p.INIT_IN.pack(7, 45, 131072, 0xFFFFFFFF)
                                  + p.INIT_IN_FLAGS2.pack(0) + bytes(44))
            assert err == 0, err
            self.init_out = p.INIT_OUT.unpack(body)

    # --- raw ------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.ours.send(data)

    def send(self, opcode: int, nodeid: int, body: bytes = b"", *, unique: int | None = None,
             length: int | None = None) -> int:
        if unique is None:
            self.unique += 2
            unique = self.unique
        size = p.IN_HEADER.size + len(body)
        header = p.IN_HEADER.pack(size if length is None else length, opcode, unique, nodeid,
                                  0, 0, os.getpid(), 0, 0)
        self.ours.send(header + body)
        return unique

    def receive(self, timeout: float = 10.0) -> tuple[int, int, bytes]:
        self.ours.settimeout(timeout)
        data = self.ours.recv(4 << 20)
        length, error, unique = p.OUT_HEADER.unpack_from(data)
        assert length == len(data), (length, len(data))
        return unique, -error, data[16:]

    def wait(self, unique: int, timeout: float = 10.0) -> tuple[int, bytes]:
        while unique not in self.replies:
            got, err, body = self.receive(timeout)
            if got == 0:
                self.extra.append(body)
                continue
            assert got not in self.replies, f"two replies to request {got}"
            self.replies[got] = (err, body)
        return self.replies.pop(unique)

    def call(self, opcode: int, nodeid: int, body: bytes = b"") -> tuple[int, bytes]:
        return self.wait(self.send(opcode, nodeid, body))

    def no_reply_within(self, seconds: float) -> bool:
        try:
            self.receive(seconds)
        except (TimeoutError, socket.timeout):
            return True
        return False

    def close(self) -> None:
        self.ours.close()
        self.thread.join(10)
        self.theirs.close()
        self.session.close()

    # --- the operations -------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> tuple[int, tuple]:
        err, body = self.call(p.LOOKUP, parent, name + b"\0")
        return err, (p.ENTRY_OUT.unpack(body) if not err else ())

    def inode(self, path: bytes) -> int:
        node = p.ROOT_ID
        for part in path.split(b"/"):
            err, entry = self.lookup(node, part)
            assert err == 0, (path, err)
            node = entry[0]
        return node

    def getattr(self, nodeid: int) -> tuple[int, tuple]:
        err, body = self.call(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0))
        return err, (p.ATTR_OUT.unpack(body) if not err else ())

    def size(self, nodeid: int) -> int:
        err, attr = self.getattr(nodeid)
        assert err == 0
        return attr[4]

    def open(self, path: bytes, flags: int = os.O_RDWR) -> tuple[int, int]:
        err, body = self.call(p.OPEN, self.inode(path), p.OPEN_IN.pack(flags, 0))
        return err, (p.OPEN_OUT.unpack(body)[0] if not err else 0)

    def fh(self, path: bytes, flags: int = os.O_RDWR) -> int:
        err, fh = self.open(path, flags)
        assert err == 0, err
        return fh

    def send_read(self, fh: int, off: int, size: int) -> int:
        return self.send(p.READ, 2, p.READ_IN.pack(fh, off, size, 0, 0, 0, 0))

    def read(self, fh: int, off: int, size: int) -> tuple[int, bytes]:
        return self.wait(self.send_read(fh, off, size))

    def send_write(self, fh: int, off: int, data: bytes) -> int:
        return self.send(p.WRITE, 2, p.WRITE_IN.pack(fh, off, len(data), 0, 0, 0, 0) + data)

    def write(self, fh: int, off: int, data: bytes) -> tuple[int, int]:
        err, body = self.wait(self.send_write(fh, off, data))
        return err, (p.WRITE_OUT.unpack(body)[0] if not err else 0)

    def fallocate(self, fh: int, off: int, length: int, mode: int) -> int:
        return self.call(p.FALLOCATE, 2, p.FALLOCATE_IN.pack(fh, off, length, mode, 0))[0]

    def setattr(self, nodeid: int, valid: int, size: int = 0) -> tuple[int, tuple]:
        fields = [0] * 16
        fields[0], fields[3] = valid, size
        err, body = self.call(p.SETATTR, nodeid, p.SETATTR_IN.pack(*fields))
        return err, (p.ATTR_OUT.unpack(body) if not err else ())

    def flush(self, fh: int) -> int:
        return self.call(p.FLUSH, 2, p.FLUSH_IN.pack(fh, 0, 0, 0))[0]

    def fsync(self, fh: int) -> int:
        return self.call(p.FSYNC, 2, p.FSYNC_IN.pack(fh, 1, 0))[0]

    def release(self, fh: int) -> int:
        return self.call(p.RELEASE, 2, p.RELEASE_IN.pack(fh, 0, 0, 0))[0]

    def readdir(self, nodeid: int) -> list[bytes]:
        err, body = self.call(p.OPENDIR, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0))
        assert err == 0
        fh = p.OPEN_OUT.unpack(body)[0]
        names, off = [], 0
        while True:
            err, body = self.call(p.READDIR, nodeid, p.READ_IN.pack(fh, off, 4096, 0, 0, 0, 0))
            assert err == 0
            if not body:
                return names
            pos = 0
            while pos < len(body):
                _ino, off, namelen, _kind = p.DIRENT.unpack_from(body, pos)
                names.append(body[pos + 24:pos + 24 + namelen])
                pos += (24 + namelen + 7) & ~7

