"""The FUSE mount options for a disk image, and why.

- Request size.  pyfuse3 asks nothing of max_write, so libfuse 3 (>= 3.6)
  uses its whole buffer: 256 pages = 1 MiB per WRITE, and the kernel
  (fs.fuse.max_pages_limit = 256) agrees.  Measured: 1 MiB writes arrive
  whole.  Going further would need both a newer libfuse and a sysctl, so
  1 MiB it is; `max_write=` is not even a libfuse 3 option.
- Cache mode: direct_io (FOPEN_DIRECT_IO on every open).  See DIRECT_IO.
- default_permissions: the kernel checks the mode bits, we never do.
- allow_other when root: the loop device, mkfs and a VM run as other users.
- fsname=lsbd, subtype=lsbd: the mount shows as `lsbd` of type `fuse.lsbd`,
  which is how `lsbd umount` recognises its own mounts.
- ro with --read-only: the kernel refuses writes before they reach us.

Not a mount option: the kernel's limit on requests in flight to us
(max_background), raised after mounting; see MAX_BACKGROUND.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("lsbd.fuse")

#: Open the image with FOPEN_DIRECT_IO.
#:
#: With it every read and write goes to the engine as issued (up to 1 MiB
#: per request), and nothing is cached twice: the file system inside the
#: image (ext4 over a loop device) already has its own page cache, and a
#: second copy of the same blocks in the image file's page cache only costs
#: memory and makes benchmarks of the loop path measure RAM.  It also keeps
#: the crash story simple: a write has reached the engine when it returns.
#:
#: Measured (bench/fuse_bench.py --page-cache, fio O_DIRECT on the image and
#: on ext4 over a loop device): within noise of the page-cache mode on the
#: image and through a direct-I/O loop device; through a buffered
#: `mount -o loop` the page-cache mode serves reads from RAM (233k vs 4.9k
#: random 4 KiB reads/s) because it keeps a second copy of blocks ext4
#: caches anyway.  The cost: no shared writable mmap of the image (ENODEV).
#: Numbers in docs/fuse.md.
DIRECT_IO = True


def mount_options(*, read_only: bool = False, allow_other: bool | None = None,
                  fsname: str = "lsbd") -> set[str]:
    opts = {"default_permissions", f"fsname={fsname}", "subtype=lsbd"}
    if allow_other is None:
        allow_other = os.geteuid() == 0
    if allow_other:
        opts.add("allow_other")
    if read_only:
        opts.add("ro")
    return opts


#: Requests the kernel lets us have in flight at once.  Asynchronous direct
#: I/O (fio with libaio, a loop device with direct I/O) travels as FUSE
#: "background" requests, which the kernel caps at 12 by default: below
#: fio's iodepth 16, a loop device's queue and the 16 worker threads, so
#: reads waiting for the store queued in the kernel while threads sat idle.
#: Measured on a FakeVolume whose reads wait 2 ms in the workers: 4k-5k 4 KiB
#: reads/s at 12, 6k at 64 (the most 16 threads can do is 8k).  Calls made
#: on the loop are served one at a time whatever the limit.
MAX_BACKGROUND = 64


def raise_max_background(major_minor: str, limit: int = MAX_BACKGROUND) -> bool:
    """Raise the kernel's max_background for the FUSE connection of the mount
    whose device is `major_minor` (from /proc/self/mountinfo), and its
    congestion_threshold with it (3/4, the kernel's own ratio).

    Only through the fusectl file system (/sys/fs/fuse/connections, which
    systemd mounts), and only as root; otherwise the kernel's default stays
    and this returns False.
    """
    major, minor = (int(x) for x in major_minor.split(":"))
    conn = f"/sys/fs/fuse/connections/{(major << 20) | minor}"  # the kernel's dev_t
    try:
        # In this order: the threshold may not exceed the limit.
        for name, value in (("max_background", limit), ("congestion_threshold", limit * 3 // 4)):
            with open(os.path.join(conn, name), "w") as f:
                f.write(f"{value}\n")
    except OSError as e:
        log.debug("max_background stays at the kernel's default: %s", e)
        return False
    log.debug("max_background %d", limit)
    return True
