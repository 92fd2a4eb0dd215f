"""The FUSE server without a kernel: requests over a socket pair.

Each test drives a Session as the kernel would (tests/support/fuse_wire.py), over
FakeVolumes: the operations, how errors become errno values, which calls
run on the queue's thread and which in workers, and that no request, short,
malformed, unknown or interrupted, takes the session down.  Needs no root.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time

import pytest
from fakes import FakeVolume
from fuse_wire import Wire
from lsbd_fuse import protocol as p
from lsbd_fuse.fs import ImageFS
from lsbd_fuse.session import Session
from lsbd_fuse.tree import Image

from lsbd.errors import CorruptionError, InvalidRequest, ReadOnlyError, StoreError

MiB = 1 << 20


def _wire(**extra: Image) -> tuple[Wire, FakeVolume]:
    vol = FakeVolume("vol", 8 * MiB)
    return _serve({"vol.img": Image(device=vol), **extra}), vol


def _serve(images: dict[str, Image]) -> Wire:
    return Wire(Session(ImageFS(images), threads=4))


@pytest.fixture
def wire():
    w, vol = _wire()
    yield w, vol
    w.close()


class BlockingVolume(FakeVolume):
    """A device that makes no promise not to block: its calls take no nowait."""

    supports_nowait = False

    def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        return super().read(offset, length)

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:  # type: ignore[override]
        super().write(offset, data, fua=fua)


def _where_calls_run(vol: FakeVolume, slow_from: int | None = None) -> list[tuple[str, bool]]:
    """Record (op, on the queue's thread) for every data call that gets as
    far as running; offsets from `slow_from` on are slow (a store fetch)."""
    seen: list[tuple[str, bool]] = []

    def delay_for(op, offset):
        slow = slow_from is not None and offset >= slow_from
        seen.append((op, threading.current_thread().name == "queue"))
        return 0.01 if slow else 0
    vol.delay_for = delay_for
    return seen


# --- INIT ----------------------------------------------------------------------------

def test_init_negotiates_large_requests_and_async_direct_io(wire):
    w, _vol = wire
    (major, minor, _ra, flags, max_background, congestion, max_write, _gran, max_pages,
     _align, _flags2) = w.init_out
    assert (major, minor) == (7, p.KERNEL_MINOR_VERSION)
    for flag in (p.ASYNC_READ, p.ASYNC_DIO, p.MAX_PAGES, p.BIG_WRITES, p.ATOMIC_O_TRUNC):
        assert flags & flag
    assert max_write == 1 * MiB and max_pages == 256
    assert max_background == 64 and congestion == 48


@pytest.mark.parametrize("ours, answered, raised", [(4 * MiB, 128 * 1024, [4 * MiB]),
                                                    (64 * 1024, 64 * 1024, [])])
def test_init_lowers_the_readahead_itself_and_raises_it_only_once_answered(ours, answered,
                                                                            raised):
    """INIT can only lower the kernel's read-ahead (it keeps the smaller of
    its own and ours), so a larger one is set once INIT is answered: by then
    the kernel has applied the answer, and ours stays."""
    calls: list[tuple[int, bool]] = []
    answer_seen = threading.Event()

    def raise_readahead(n: int) -> None:
        # waits for the answer to INIT to arrive: never, if it comes after
        calls.append((n, answer_seen.wait(5)))
    session = Session(ImageFS({"vol.img": Image(device=FakeVolume("vol", MiB))}),
                      threads=2, readahead=ours, raise_readahead=raise_readahead)
    w = Wire(session, init=False)
    try:
        err, body = w.call(p.INIT, 0, p.INIT_IN.pack(7, 45, 128 * 1024, 0xFFFFFFFF)
                           + p.INIT_IN_FLAGS2.pack(0) + bytes(44))
        answer_seen.set()
        assert err == 0
        assert p.INIT_OUT.unpack(body)[2] == answered
        assert w.getattr(p.ROOT_ID)[0] == 0       # the same queue: INIT is done
        assert calls == [(n, True) for n in raised]
    finally:
        w.close()


# --- the operations ------------------------------------------------------------------

def test_read_write_any_offset_and_the_end(wire):
    w, vol = wire
    fh = w.fh(b"vol.img")
    assert w.write(fh, 4093, b"abcdefgh") == (0, 8)              # across a block edge
    assert w.read(fh, 4090, 16) == (0, b"\0\0\0abcdefgh\0\0\0\0\0")
    assert w.read(fh, 8 * MiB - 3, 100) == (0, b"\0\0\0")        # short read at the end
    assert w.read(fh, 8 * MiB, 100) == (0, b"")                  # EOF
    assert w.write(fh, 8 * MiB - 2, b"xyz") == (0, 2)            # short write at the end
    assert w.write(fh, 8 * MiB, b"x")[0] == errno.ENOSPC         # a disk does not grow
    assert w.release(fh) == 0
    assert vol.read(8 * MiB - 2, 2) == b"xy"


def test_only_grow_and_no_o_trunc(wire):
    w, vol = wire
    inode = w.inode(b"vol.img")
    err, _ = w.call(p.OPEN, inode, p.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC, 0))
    assert err == errno.EINVAL                                   # dd without conv=notrunc
    assert w.setattr(inode, p.FATTR_SIZE, 0)[0] == errno.EINVAL
    err, attr = w.setattr(inode, p.FATTR_SIZE, 8 * MiB)
    assert err == 0 and attr[4] == 8 * MiB
    err, attr = w.setattr(inode, p.FATTR_SIZE, 16 * MiB)
    assert err == 0 and attr[4] == 16 * MiB
    assert w.size(inode) == 16 * MiB and vol.size == 16 * MiB
    assert w.setattr(inode, p.FATTR_MODE)[0] == errno.EPERM
    assert w.setattr(inode, p.FATTR_MTIME_NOW)[0] == 0          # touch


def test_a_size_changed_elsewhere_is_seen(wire):
    w, vol = wire
    inode = w.inode(b"vol.img")
    vol.resize(12 * MiB)                       # `lsbd resize` through the running writer
    assert [n.inode for n in w.session.fs.changed_sizes()] == [inode]
    assert w.session.fs.changed_sizes() == []
    assert w.size(inode) == 12 * MiB
    fh = w.fh(b"vol.img")
    assert w.write(fh, 10 * MiB, b"past the old end") == (0, 16)


@pytest.mark.parametrize("exc, code", [
    (CorruptionError("bad crc", key="segments/x", offset=4096), errno.EIO),
    (StoreError("connection reset"), errno.EIO),
    (StoreError("no space", errno.ENOSPC), errno.ENOSPC),
    (StoreError("reset", errno.ECONNRESET), errno.EIO),
    (FileNotFoundError(errno.ENOENT, "a cache file vanished"), errno.EIO),
    (InvalidRequest("out of range"), errno.EINVAL),
    (ReadOnlyError("read-only"), errno.EROFS),
    (RuntimeError("a bug"), errno.EIO),
])
@pytest.mark.parametrize("device", [FakeVolume, BlockingVolume], ids=["inline", "worker"])
def test_engine_errors_become_errno(exc, code, device):
    vol = device("vol", 8 * MiB)
    w = _serve({"vol.img": Image(device=vol)})
    try:
        fh = w.fh(b"vol.img")
        vol.fail_next(exc)
        assert w.read(fh, 0, 4096)[0] == code
        assert w.read(fh, 0, 4096) == (0, bytes(4096))         # and the next request works
    finally:
        w.close()


def test_read_only_images_and_directories():
    snap = FakeVolume("snap", 4 * MiB, read_only=True)
    w, _vol = _wire(**{"snapshots/monday.img": Image(device=snap, read_only=True)})
    try:
        assert w.readdir(p.ROOT_ID) == [b"snapshots", b"vol.img"]
        err, snaps = w.lookup(p.ROOT_ID, b"snapshots")
        assert err == 0 and snaps[15] & 0o170000 == 0o040000   # mode: a directory
        err, entry = w.lookup(snaps[0], b"monday.img")
        assert err == 0 and entry[7] == 4 * MiB and entry[15] & 0o777 == 0o444
        assert w.open(b"snapshots/monday.img", os.O_RDWR)[0] == errno.EROFS
        fh = w.fh(b"snapshots/monday.img", os.O_RDONLY)
        assert w.read(fh, 0, 10) == (0, bytes(10))
        # A write to a read-only image (say, a handle opened before a remount ro).
        assert w.write(fh, 0, b"x")[0] == errno.EROFS
        assert w.fallocate(fh, 0, 4096, 0x03) == errno.EROFS
        assert w.call(p.CREATE, p.ROOT_ID, struct.pack("<IIII", os.O_RDWR, 0o644, 0, 0)
                      + b"new\0")[0] == errno.EPERM
        assert w.read(w.fh(b"vol.img"), 0, 4) == (0, bytes(4))  # still up
    finally:
        w.close()


def test_flush_and_fsync(wire):
    w, vol = wire
    reader = w.fh(b"vol.img", os.O_RDONLY)
    assert w.flush(reader) == 0              # close(2) of a reader: nothing to make durable
    assert vol.calls["flush"] == 0
    writer = w.fh(b"vol.img", os.O_WRONLY)
    assert w.flush(writer) == 0
    assert vol.calls["flush"] == 1
    assert w.fsync(reader) == 0              # fsync is asked for: always a FLUSH
    assert vol.calls["flush"] == 2


@pytest.mark.parametrize("mode, op", [(0x03, "trim"), (0x10, "write_zeroes"),
                                      (0x11, "write_zeroes")])
def test_fallocate_discards_and_zeroes(wire, mode, op):
    w, vol = wire
    fh = w.fh(b"vol.img")
    w.write(fh, 0, b"\xff" * (64 * 1024))
    assert w.fallocate(fh, 4096, 8192 + 100, mode) == 0
    assert vol.calls[op] == 1
    _, data = w.read(fh, 0, 64 * 1024)
    assert data == b"\xff" * 4096 + bytes(8192 + 100) + b"\xff" * (64 * 1024 - 12288 - 100)
    # Past the end: clipped when the size is kept, refused when the image would grow.
    assert w.fallocate(fh, 8 * MiB - 4096, 8192, mode | p.FALLOC_FL_KEEP_SIZE) == 0
    if not mode & p.FALLOC_FL_KEEP_SIZE:
        assert w.fallocate(fh, 8 * MiB - 4096, 8192, mode) == errno.ENOSPC


def test_fallocate_modes_that_are_not_a_disk_s(wire):
    w, vol = wire
    fh = w.fh(b"vol.img")
    assert w.fallocate(fh, 0, MiB, 0) == 0                        # allocate inside: nothing to do
    assert w.fallocate(fh, 0, 16 * MiB, 0) == errno.ENOSPC         # would grow the image
    assert w.fallocate(fh, 0, 4096, p.FALLOC_FL_PUNCH_HOLE) == errno.EOPNOTSUPP  # needs KEEP_SIZE
    assert w.fallocate(fh, 0, 4096, 0x08) == errno.EOPNOTSUPP     # COLLAPSE_RANGE
    assert w.fallocate(fh, 0, 0, 0x03) == errno.EINVAL
    assert vol.calls["trim"] == vol.calls["write_zeroes"] == 0


def test_small_writes_waiting_together_go_to_the_engine_as_one_batch():
    vol = FakeVolume("vol", 8 * MiB)
    w = Wire(Session(ImageFS({"vol.img": Image(device=vol)}), threads=2), init=False,
             start=False)
    try:
        w.send(p.INIT, 0, p.INIT_IN.pack(7, 45, 0, 0))
        w.send(p.LOOKUP, p.ROOT_ID, b"vol.img\0")
        w.send(p.OPEN, 2, p.OPEN_IN.pack(os.O_RDWR, 0))
        fh = 1                                          # the first handle
        blocks = [os.urandom(4096 * (1 + i % 3)) for i in range(10)]
        sent = [w.send_write(fh, i * 16384, b) for i, b in enumerate(blocks)]
        sent.append(w.send_write(fh, 5, b"unaligned"))  # not batched: ends the batch
        sent.append(w.send_write(fh, 8 * MiB - 4096, blocks[1]))  # past the end: on its own
        last = w.send_read(fh, 0, 16384 * 10)
        w.thread.start()                                # everything is waiting at once
        for u in range(2, 7, 2):
            assert w.wait(u)[0] == 0
        for u, b in zip(sent, blocks):
            err, body = w.wait(u)
            assert err == 0 and p.WRITE_OUT.unpack(body)[0] == len(b)
        assert w.wait(sent[10]) == (0, p.WRITE_OUT.pack(9, 0))
        assert w.wait(sent[11]) == (0, p.WRITE_OUT.pack(4096, 0))   # a short write
        err, data = w.wait(last)
        assert err == 0
        for i, b in enumerate(blocks):
            want = b if i else b[:5] + b"unaligned" + b[14:]
            assert data[i * 16384:i * 16384 + len(b)] == want
        assert vol.calls["write_many"] == 1 and vol.calls["write"] == 12
    finally:
        w.close()


# --- inline or in a worker -----------------------------------------------------------

def test_inline_when_the_device_promises_not_to_block(wire):
    w, vol = wire
    seen = _where_calls_run(vol)
    fh = w.fh(b"vol.img")
    assert w.write(fh, 4093, b"abcdefgh") == (0, 8)
    assert w.read(fh, 4090, 16) == (0, b"\0\0\0abcdefgh\0\0\0\0\0")
    assert w.fallocate(fh, 0, 4096, 0x03) == 0
    assert w.flush(fh) == 0                   # a flush may wait: always a worker
    err, data = w.read(fh, 0, 192 * 1024)     # a large read: a worker
    assert err == 0 and len(data) == 192 * 1024 and data[4093:4101] == bytes(3) + b"defgh"
    assert seen == [("write", True), ("read", True), ("trim", True), ("read", False)]
    assert vol.calls["write"] == vol.calls["flush"] == 1


def test_would_block_goes_to_a_worker(wire):
    w, vol = wire
    seen = _where_calls_run(vol, slow_from=4 * MiB)
    fh = w.fh(b"vol.img")
    assert w.write(fh, 4 * MiB + 10, b"slow") == (0, 4)
    assert w.write(fh, 10, b"fast") == (0, 4)
    assert w.read(fh, 4 * MiB + 8, 8) == (0, b"\0\0slow\0\0")
    assert w.read(fh, 8, 8) == (0, b"\0\0fast\0\0")
    assert w.fallocate(fh, 4 * MiB, 4096, 0x10) == 0
    # The first try on the queue's thread does nothing; the worker does the call.
    assert seen == [("write", True), ("write", False), ("write", True),
                    ("read", True), ("read", False), ("read", True),
                    ("write_zeroes", True), ("write_zeroes", False)]
    assert vol.calls["write"] == vol.calls["read"] == 2


def test_devices_without_nowait_use_the_workers():
    vol = BlockingVolume("vol", 8 * MiB)
    w = _serve({"vol.img": Image(device=vol)})
    seen = _where_calls_run(vol)
    try:
        fh = w.fh(b"vol.img")
        assert w.write(fh, 0, b"data") == (0, 4)
        assert w.read(fh, 0, 4) == (0, b"data")
    finally:
        w.close()
    assert seen == [("write", False), ("read", False)]


def test_a_slow_store_fetch_does_not_stall_the_others(wire):
    w, vol = wire
    vol.delay_for = lambda op, offset: 1.0 if offset >= 4 * MiB else 0
    fh = w.fh(b"vol.img")
    start = time.monotonic()
    slow = [w.send_read(fh, 4 * MiB, 4096), w.send_write(fh, 5 * MiB, b"x" * 4096)]
    fast = []
    for i in range(20):
        fast.append(w.send_read(fh, i * 4096, 4096))
        fast.append(w.send_write(fh, (100 + i) * 4096, b"y" * 4096))
    for u in fast:
        assert w.wait(u)[0] == 0
    assert time.monotonic() - start < 0.9      # none waited for the slow ones
    for u in slow:
        assert w.wait(u)[0] == 0
    assert time.monotonic() - start < 1.8      # the slow calls ran side by side


# --- requests that are wrong, unknown, or not to be answered --------------------------

def test_short_and_malformed_requests_get_einval_and_the_session_lives(wire):
    w, _vol = wire
    fh = w.fh(b"vol.img")
    # Shorter than a header: nothing to answer to when even the unique is missing.
    w.send_raw(b"\x05\0\0\0")
    assert w.no_reply_within(0.2)
    # A header that claims more bytes than arrived, and one that claims fewer.
    unique = w.send(p.GETATTR, 1, p.GETATTR_IN.pack(0, 0, 0), length=200)
    assert w.wait(unique)[0] == errno.EINVAL
    unique = w.send(p.GETATTR, 1, p.GETATTR_IN.pack(0, 0, 0), length=41)
    assert w.wait(unique)[0] == errno.EINVAL
    # A header and half a body.
    for opcode in (p.READ, p.WRITE, p.SETATTR, p.OPEN, p.FALLOCATE, p.INIT, p.RELEASE):
        assert w.call(opcode, 2, b"\0" * 7)[0] == errno.EINVAL, opcode
    # A WRITE whose size disagrees with the data it carries.
    body = p.WRITE_IN.pack(fh, 0, 100, 0, 0, 0, 0) + b"x" * 10
    assert w.call(p.WRITE, 2, body)[0] == errno.EINVAL
    # A LOOKUP with no name at all.
    assert w.call(p.LOOKUP, 1, b"")[0] == errno.EINVAL
    # A handle never opened.
    assert w.read(12345, 0, 10)[0] == errno.EBADF
    assert w.read(fh, 0, 4) == (0, bytes(4))


def test_unknown_opcodes_get_enosys(wire):
    w, _vol = wire
    for opcode in (p.GETXATTR, p.LSEEK, p.SYNCFS, 31, 39, 47, 52, 99, 4096, 0xFFFFFFFF):
        assert w.call(opcode, 1, b"\0" * 64)[0] == errno.ENOSYS, opcode
    assert w.size(w.inode(b"vol.img")) == 8 * MiB


def test_a_missing_node(wire):
    w, _vol = wire
    assert w.lookup(p.ROOT_ID, b"nosuch.img")[0] == errno.ENOENT
    assert w.getattr(999)[0] == errno.ENOENT
    assert w.call(p.OPEN, 999, p.OPEN_IN.pack(os.O_RDONLY, 0))[0] == errno.ENOENT
    assert w.lookup(w.inode(b"vol.img"), b"x")[0] == errno.ENOTDIR
    assert w.size(w.inode(b"vol.img")) == 8 * MiB


def test_forget_and_interrupt_get_no_reply(wire):
    w, vol = wire
    w.send(p.FORGET, 2, struct.pack("<Q", 1))
    w.send(p.BATCH_FORGET, 0, struct.pack("<II", 1, 0) + struct.pack("<QQ", 2, 1))
    w.send(p.FORGET, 2, b"")                                       # even a short one
    assert w.no_reply_within(0.2)
    # An interrupted request: the read waits for its "store"; the INTERRUPT
    # names it.  The read is still answered, once, and nothing else is.
    vol.delay_for = lambda op, offset: 0.5 if offset >= 4 * MiB else 0
    fh = w.fh(b"vol.img")
    slow = w.send_read(fh, 4 * MiB, 4096)
    w.send(p.INTERRUPT, 0, p.INTERRUPT_IN.pack(slow))
    assert w.read(fh, 0, 4) == (0, bytes(4))                       # answered meanwhile
    assert w.wait(slow) == (0, bytes(4096))
    assert w.no_reply_within(0.3)
    assert w.size(w.inode(b"vol.img")) == 8 * MiB


def test_end_of_the_session():
    w, _vol = _wire()
    w.ours.close()                          # as ENODEV on /dev/fuse after an unmount
    assert w.session.ended.wait(5)
    w.thread.join(5)
    assert not w.thread.is_alive()
    w.theirs.close()
    w.session.close()


def test_no_dev_fuse_is_one_clear_line(tmp_path, monkeypatch):
    from lsbd_fuse import mounts

    real = os.path.exists
    monkeypatch.setattr(mounts.os.path, "exists", lambda p: p != "/dev/fuse" and real(p))
    with pytest.raises(mounts.MountError) as e:
        mounts.check_can_mount(str(tmp_path))
    assert str(e.value).startswith("no /dev/fuse: load the fuse module")
