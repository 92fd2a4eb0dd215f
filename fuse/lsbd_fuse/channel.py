"""Getting a /dev/fuse connection for a mount point, and letting it go.

As root the mount is made with mount(2) on an fd of /dev/fuse we opened.
Without root (or where mount(2) is refused) fusermount3 makes it and hands
the fd back over a Unix socket (its _FUSE_COMMFD protocol, as libfuse does).
More queues are clones of that fd (FUSE_DEV_IOC_CLONE): the kernel gives
each request to whichever queue reads first, and takes the reply on the fd
the request came from.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import struct
import subprocess

from lsbd import linux
from lsbd_fuse import protocol as p

log = logging.getLogger("lsbd.fuse")


def mount(mountpoint: str, *, read_only: bool, allow_other: bool, fsname: str = "lsbd",
          subtype: str = "lsbd") -> int:
    """Mount a FUSE file system on `mountpoint`; returns its /dev/fuse fd.
    Raises OSError."""
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        data = (f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
                "default_permissions" + (",allow_other" if allow_other else ""))
        flags = linux.MS_NOSUID | linux.MS_NODEV | (linux.MS_RDONLY if read_only else 0)
        try:
            linux.mount(fsname, mountpoint, f"fuse.{subtype}", flags, data)
            return fd
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EPERM or not shutil.which("fusermount3"):
                raise
            log.debug("mount(2) refused (%s): trying fusermount3", e)
    opts = ["default_permissions", f"fsname={fsname}", f"subtype={subtype}"]
    if allow_other:
        opts.append("allow_other")
    if read_only:
        opts.append("ro")
    return _fusermount(mountpoint, ",".join(opts))


def _fusermount(mountpoint: str, options: str) -> int:
    tool = shutil.which("fusermount3")
    if tool is None:
        raise OSError(errno.EPERM, "mounting without root needs fusermount3 (install fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        r = subprocess.run([tool, "-o", options, "--", mountpoint], pass_fds=(theirs.fileno(),),
                           env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
                           capture_output=True, text=True, check=False)
        theirs.close()
        if r.returncode != 0:
            lines = (r.stderr or r.stdout).strip().splitlines()
            reason = lines[-1] if lines else f"fusermount3 exited {r.returncode}"
            raise OSError(errno.EPERM, reason.removeprefix("fusermount3: "))
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EIO, "fusermount3 mounted but sent no /dev/fuse fd")
    os.set_inheritable(fds[0], False)
    return fds[0]


def clone(fd: int) -> int:
    """Another queue of the session whose fd is `fd`."""
    new = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(new, p.DEV_IOC_CLONE, struct.pack("I", fd))
    except OSError:
        os.close(new)
        raise
    return new


def set_readahead(major_minor: str, nbytes: int) -> None:
    """Set the read-ahead of the FUSE mount whose device is `major_minor`
    (its bdi, named by the superblock's device number).  Root only; raises
    OSError."""
    with open(f"/sys/class/bdi/{major_minor}/read_ahead_kb", "w") as f:
        f.write(f"{max(nbytes // 1024, 0)}\n")


def readahead_of(major_minor: str) -> int:
    """The read-ahead of that mount, in bytes.  Raises OSError."""
    with open(f"/sys/class/bdi/{major_minor}/read_ahead_kb") as f:
        return int(f.read()) * 1024


def detach(mountpoint: str) -> None:
    """Unmount lazily: the mount point is free at once; a loop device still
    on an image keeps the file system until it lets go."""
    if os.geteuid() == 0:
        try:
            linux.umount2(mountpoint, linux.MNT_DETACH)
            return
        except OSError as e:
            if e.errno == errno.EINVAL:  # not mounted (any more)
                return
            if e.errno != errno.EPERM:
                raise
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        subprocess.run([tool, "-u", "-z", "-q", mountpoint], capture_output=True, check=False)
