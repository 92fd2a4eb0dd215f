"""The choices of a mount that are not protocol, and why.

- Cache mode: direct_io (FOPEN_DIRECT_IO on every open).  See DIRECT_IO.
- default_permissions: the kernel checks the mode bits, we never do.
- allow_other when root: the loop device, mkfs and a VM run as other users.
- fsname=lsbd, subtype=lsbd: the mount shows as `lsbd` of type `fuse.lsbd`,
  which is how `lsbd umount` recognises its own mounts.
- ro with --read-only: the kernel refuses writes before they reach us.
- Queues: see QUEUES.

Request size (1 MiB), max_background and the INIT flags are negotiated in
`session`, with their reasons.
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
#: Measured with the earlier front end (bench/fuse_bench.py --page-cache, fio
#: O_DIRECT on the image and on ext4 over a loop device): within noise of the
#: page-cache mode on the image and through a direct-I/O loop device; through
#: a buffered `mount -o loop` the page-cache mode serves reads from RAM
#: because it keeps a second copy of blocks ext4 caches anyway.  The cost: no
#: shared writable mmap of the image (ENODEV).  Numbers in docs/fuse.md.
DIRECT_IO = True

#: /dev/fuse fds (threads reading requests) per mount.  See docs/fuse.md for
#: the measurement behind the default; LSBD_FUSE_QUEUES overrides it.
QUEUES = int(os.environ.get("LSBD_FUSE_QUEUES", "2") or 2)

#: Requests the kernel lets us have in flight at once (max_background, set
#: in INIT; the kernel's default is 12).  Asynchronous direct I/O (fio with
#: libaio, a loop device with direct I/O) travels as background requests:
#: 12 is below fio's iodepth 16 and the worker threads.  With a FakeVolume
#: whose reads wait 2 ms in the workers, 4 KiB random reads went from 4k-5k/s
#: at 12 to 6k at 64.
MAX_BACKGROUND = 64


def allow_other_default() -> bool:
    return os.geteuid() == 0
