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
"""

from __future__ import annotations

import os

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
