"""Linux system calls that Python's standard library does not wrap.

Every ctypes call of the project belongs here, each with a fallback or a
clear OSError when the C library or the kernel lacks it.
"""

from __future__ import annotations

import ctypes
import os

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str, path: str | None = None) -> None:
    if result != 0:
        err = ctypes.get_errno()
        if path:
            raise OSError(err, os.strerror(err), path)
        raise OSError(err, f"{what}: {os.strerror(err)}")


# --- mount(2), umount2(2) ---------------------------------------------------------

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4

MNT_FORCE = 1
MNT_DETACH = 2


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError (EPERM without CAP_SYS_ADMIN)."""
    fn = _c().mount
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p]
    _check(fn(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode()),
           "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2); MNT_DETACH detaches now and lets the last user finish."""
    fn = _c().umount2
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    _check(fn(os.fsencode(target), flags), "umount2", target)


# --- prctl(2) ----------------------------------------------------------------------

PR_SET_IO_FLUSHER = 57


def set_io_flusher() -> None:
    """prctl(PR_SET_IO_FLUSHER, 1): this process is in the I/O path (a loop
    device writes through it), so its allocations must not wait on writeback
    that needs it.  Needs CAP_SYS_RESOURCE; raises OSError without it."""
    fn = _c().prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _check(fn(PR_SET_IO_FLUSHER, 1, 0, 0, 0), "prctl(PR_SET_IO_FLUSHER)")
