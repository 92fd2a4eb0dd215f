"""The choices of a mount that are not protocol, and why.

- Cache mode: the page cache (FOPEN_DIRECT_IO only with --direct-io).  See DIRECT_IO.
- default_permissions: the kernel checks the mode bits, we never do.
- allow_other when root: the loop device, mkfs and a VM run as other users.
- fsname=lsbd, subtype=lsbd: the mount shows as `lsbd` of type `fuse.lsbd`,
  which is how `lsbd umount` recognises its own mounts.
- ro with --read-only: the kernel refuses writes before they reach us.
- Queues: see QUEUES.
- Read-ahead of the image: see READAHEAD.

Request size (1 MiB), max_background and the INIT flags are negotiated in
`session`, with their reasons.
"""

from __future__ import annotations

import os

#: Open the image with FOPEN_DIRECT_IO (`lsbd mount --direct-io`); off by
#: default: the image has a page cache, as any file does.
#:
#: A loop device without direct I/O (`mount -o loop`, the usual way) reads
#: its file through that page cache, so the kernel's read-ahead on the image
#: turns ext4's reads into fewer, larger requests, several in flight at once
#: (ASYNC_READ), and a read that waits for the store does not hold up the
#: next.  With FOPEN_DIRECT_IO each of the loop device's reads reached lsbd
#: on its own, one after another.  Measured with bench/distant_bench.py
#: (the same run, lsbd both ways): a cold read of a 386 MiB tree on a new
#: cache 5.3-6.5 s against 6.6-8.0 s at 10 ms, its warm read 1.8-2.7 s
#: against 1.9-3.2 s; figures in docs/distant.md.
#:
#: What stays true (docs/fuse.md, tested in tests/integration/test_fuse*.py):
#: writes are written through (no writeback cache is asked for), so a write
#: has reached the engine when it returns; a write that fails leaves its
#: pages out of the cache; fallocate (TRIM, zeroing) drops the range from the
#: cache; every open starts from the engine's data (no FOPEN_KEEP_CACHE).
#: The cost: blocks the file system inside caches too may sit twice in
#: memory (the kernel reclaims either), and a benchmark through a buffered
#: loop device reads RAM on a second pass; `--direct-io` (or a loop device
#: with direct I/O) measures the engine.
DIRECT_IO = False

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


#: The kernel's read-ahead on the image, in bytes (`lsbd mount --readahead`).
#: The kernel's own default is 128 KiB, and INIT can only lower it
#: (max_readahead); root raises it once INIT is answered, through the mount's
#: bdi (/sys/class/bdi/MAJOR:MINOR/read_ahead_kb).  Without root it stays at
#: the kernel's default.  4 MiB: a loop device's sequential reads then reach
#: lsbd four 1 MiB requests at a time, where 1 MiB gave one or two (a cold
#: read from a store 10 ms away: 0.32 s faster, median of 12 runs;
#: docs/operations.md, "A distant store").
READAHEAD = 4 << 20


def allow_other_default() -> bool:
    return os.geteuid() == 0
