"""Serve a set of images on a mount point until it is unmounted.

The life of a mount: `channel.mount` mounts and gives the /dev/fuse fd; one
thread per queue serves requests until the kernel ends the session
(umount / fusermount3 -u: reads get ENODEV) or a signal asks us to stop
(then the mount is detached lazily and data requests still arriving get
EIO); the engine calls in flight finish; then every device is closed, which
flushes and uploads what is pending and releases the writer lease.  Only
after that does the process exit, so "the process is gone" means "the data
is safe".  Nothing waits for DESTROY: the kernel does not send it here.

A volume grown by another path (`lsbd resize`, through the running writer)
is announced to the kernel (FUSE_NOTIFY_INVAL_INODE) before the writer
answers, so the image shows its new size when `lsbd resize` returns and a
`losetup -c` right after it finds it; the main thread also watches the
images' sizes, for any other path.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping

from lsbd.engine.api import BlockDevice
from lsbd_fuse import channel
from lsbd_fuse.fs import ImageFS
from lsbd_fuse.mounts import (MountEntry, MountError, find_mount, record_close_state, remove_pid_file,
                               write_pid_file)
from lsbd_fuse.options import DIRECT_IO, QUEUES, READAHEAD, allow_other_default
from lsbd_fuse.session import Session
from lsbd_fuse.tree import Image

log = logging.getLogger("lsbd.fuse")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: How often the main thread looks for sizes changed elsewhere.
SIZE_POLL = 0.25


def _devices(images: Mapping[str, Image]) -> list[BlockDevice]:
    """Each distinct device once, the read-only ones first."""
    seen: dict[int, BlockDevice] = {}
    for image in images.values():
        seen.setdefault(id(image.device), image.device)
    return sorted(seen.values(), key=lambda d: not getattr(d, "read_only", False))


def close_devices(images: Mapping[str, Image]) -> str | None:
    """Close every distinct device, the read-only ones first (they only
    remove their temporary folders; a writer may wait for the store);
    returns the first error message, if any."""
    first: str | None = None
    for dev in _devices(images):
        name = getattr(dev, "name", "?")
        try:
            dev.close()
        except Exception as e:
            log.error("closing %s failed: %s", name, e, exc_info=log.isEnabledFor(logging.DEBUG))
            first = first or f"{name}: {e}"
        else:
            log.info("closed %s", name)
    return first


def left_waiting(images: Mapping[str, Image]) -> str | None:
    """What closed devices left in the cache dir for the next open, in words."""
    parts = []
    for d in _devices(images):
        waiting = getattr(d, "left_waiting", None)
        if waiting:
            parts.append(f"{getattr(d, 'name', '?')}: {waiting}; they wait in the cache dir "
                         f"{getattr(d, 'folder', '?')}")
    return "; ".join(parts) or None


def give_up_uploads(images: Mapping[str, Image]) -> bool:
    """Ask every writer to stop waiting for the store (from a thread: the
    main thread may hold an upload lock); False if none can."""
    devices = [d for d in _devices(images) if hasattr(d, "give_up_uploads")]
    if devices:
        threading.Thread(target=lambda: [d.give_up_uploads() for d in devices],
                         name="lsbd-give-up", daemon=True).start()
    return bool(devices)


def _readahead_setter(entry: MountEntry | None) -> Callable[[int], None] | None:
    """Raises the read-ahead of the mount `entry` (from the mount table);
    without root it stays at the kernel's default, said once in the log."""
    if entry is None:
        return None

    def set_it(nbytes: int) -> None:
        try:
            channel.set_readahead(entry.major_minor, nbytes)
        except OSError as e:
            log.info("the read-ahead of the images stays at the kernel's default: setting "
                     "/sys/class/bdi/%s/read_ahead_kb: %s", entry.major_minor, e.strerror or e)
        else:
            log.debug("read-ahead of the images: %d KiB", nbytes // 1024)
    return set_it


class _StopNow(BaseException):
    """A stop signal while closing: give up waiting (for the store)."""


def serve(images: Mapping[str, Image], mountpoint: str, *, name: str = "",
          read_only: bool = False, direct_io: bool = DIRECT_IO, queues: int = QUEUES,
          on_ready: Callable[[], None] | None = None, log_file: str = "",
          debug: bool = False, readahead: int = READAHEAD) -> int:
    """Mount `images` on `mountpoint` and serve until unmounted; closes the
    devices in every case.  Returns 0 if the devices closed cleanly.

    Raises MountError if the mount itself fails (the devices are closed).
    """
    if debug:
        logging.getLogger("lsbd.fuse").setLevel(logging.DEBUG)
    fs = ImageFS(images, direct_io=direct_io)
    ro = read_only or all(i.read_only for i in images.values())
    try:
        fd = channel.mount(mountpoint, read_only=ro, allow_other=allow_other_default())
    except OSError as e:
        close_devices(images)
        raise MountError(f"could not mount on {mountpoint}: {e.strerror or e}") from None
    session = Session(fs, readahead=readahead,
                      raise_readahead=_readahead_setter(find_mount(mountpoint)))
    fds = [fd]
    try:
        for _ in range(queues - 1):
            fds.append(channel.clone(fd))
    except OSError as e:
        log.warning("serving one queue only: cloning /dev/fuse failed: %s", e)
    session.fds = fds
    sizes_lock = threading.Lock()

    def announce_sizes() -> None:
        with sizes_lock:
            for node in fs.changed_sizes():
                log.info("%s is now %d bytes", node.name, node.size)
                session.notify_inval_inode(node.inode)

    for dev in _devices(images):
        getattr(dev, "resize_listeners", []).append(announce_sizes)
    stop: list[str] = []
    closing = False
    gave_up = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal gave_up
        name = signal.Signals(signum).name
        if closing and not gave_up:
            # The close waits for uploads (the store is down or slow): stop
            # waiting; the close goes on and keeps the lease, and the next
            # mount uploads the rest.  `lsbd umount --timeout` sends this.
            gave_up = True
            if give_up_uploads(images):
                log.warning("got %s while closing: no longer waiting for the store; what "
                            "is not uploaded stays in the cache dir and the next mount "
                            "uploads it", name)
                return
        if closing:
            # Still closing (stuck elsewhere): stop now.  The journal in the
            # cache dir keeps what is not uploaded.
            log.warning("got %s while closing: stopping now; what is not uploaded stays in "
                        "the cache dir and the next mount uploads it", name)
            raise _StopNow
        stop.append(name)
        session.ended.set()

    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    readers = [threading.Thread(target=session.serve_fd, args=(f,), name=f"lsbd-fuse-q{i}",
                                daemon=True) for i, f in enumerate(fds)]
    for t in readers:
        t.start()
    write_pid_file(mountpoint, name=name, log=log_file)
    log.info("serving %s on %s (%d queue%s)", ", ".join(images), mountpoint, len(fds),
             "s" if len(fds) > 1 else "")
    if on_ready is not None:
        on_ready()
    error: str | None = None
    try:
        try:
            while not session.ended.wait(SIZE_POLL):
                announce_sizes()
            if stop:
                log.warning("got %s: stopping (the mount is detached lazily; a loop device "
                            "still on the image gets I/O errors)", stop[0])
                session.stopping = True
                try:
                    channel.detach(mountpoint)
                except OSError as e:
                    log.error("detaching %s: %s", mountpoint, e)
        finally:
            closing = True
            log.info("unmounted %s; closing", mountpoint)
            try:
                session.close()  # the engine calls in flight finish first
                error = close_devices(images)
                waiting = left_waiting(images)
                if error or waiting:
                    record_close_state(mountpoint, error=error, waiting=waiting)
                else:
                    remove_pid_file(mountpoint)
            except _StopNow:
                error = "stopped while closing"
                remove_pid_file(mountpoint)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    # A queue still in read(2) (after a signal) keeps its fd; the process's
    # exit closes it.
    for t, f in zip(readers, fds):
        t.join(0 if stop else 1)
        if not t.is_alive():
            os.close(f)
    return 1 if error else 0
