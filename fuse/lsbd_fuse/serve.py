"""Serve a set of images on a mount point until it is unmounted.

The life of a mount: pyfuse3.init mounts; the trio loop serves until the
kernel ends the session (umount / fusermount3 -u) or a signal asks us to
stop; then the mount is detached (if it is not gone already) and every
device is closed, which flushes and uploads what is pending and releases the
writer lease.  Only after that does the process exit, so "the process is
gone" means "the data is safe".
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Mapping

import pyfuse3
import trio

from lsbd.engine.api import BlockDevice
from lsbd_fuse.fs import ImageFS
from lsbd_fuse.mounts import (
    MountError,
    find_mount,
    record_close_error,
    remove_pid_file,
    write_pid_file,
)
from lsbd_fuse.options import DIRECT_IO, mount_options, raise_max_background
from lsbd_fuse.tree import Image

log = logging.getLogger("lsbd.fuse")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def close_devices(images: Mapping[str, Image]) -> str | None:
    """Close every distinct device; returns the first error message, if any."""
    seen: dict[int, BlockDevice] = {}
    for image in images.values():
        seen.setdefault(id(image.device), image.device)
    first: str | None = None
    for dev in seen.values():
        name = getattr(dev, "name", "?")
        try:
            dev.close()
        except Exception as e:
            log.error("closing %s failed: %s", name, e, exc_info=log.isEnabledFor(logging.DEBUG))
            first = first or f"{name}: {e}"
        else:
            log.info("closed %s", name)
    return first


async def _main(on_ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        if on_ready is not None:
            on_ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.warning("got %s: stopping (the mount is detached lazily)",
                        signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def serve(images: Mapping[str, Image], mountpoint: str, *, name: str = "",
          read_only: bool = False, direct_io: bool = DIRECT_IO,
          on_ready: Callable[[], None] | None = None, log_file: str = "",
          debug: bool = False) -> int:
    """Mount `images` on `mountpoint` and serve until unmounted; closes the
    devices in every case.  Returns 0 if the devices closed cleanly.

    Raises MountError if the mount itself fails (the devices are closed).
    """
    fs = ImageFS(images, direct_io=direct_io)
    opts = mount_options(read_only=read_only or all(i.read_only for i in images.values()))
    if debug:
        opts.add("debug")
    try:
        pyfuse3.init(fs, mountpoint, opts)
    except Exception as e:  # noqa: BLE001 - pyfuse3 raises RuntimeError, OSError, ...
        close_devices(images)
        raise MountError(f"could not mount on {mountpoint}: {e}") from None
    entry = find_mount(mountpoint)
    if entry is not None:
        raise_max_background(entry.major_minor)
    write_pid_file(mountpoint, name=name, log=log_file)
    log.info("serving %s on %s", ", ".join(images), mountpoint)
    try:
        trio.run(_main, on_ready)
    except BaseException:
        log.exception("the FUSE loop failed")
        raise
    finally:
        # After a normal umount the session is gone and this is a no-op; after
        # a signal it detaches the mount so new requests fail fast instead of
        # hanging while we close.
        pyfuse3.close(unmount=True)
        fs.stop_workers()
        log.info("unmounted %s; closing", mountpoint)
        error = close_devices(images)
        if error:
            record_close_error(mountpoint, error)
        else:
            remove_pid_file(mountpoint)
    return 1 if error else 0
