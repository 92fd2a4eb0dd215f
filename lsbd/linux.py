"""Linux system calls (and one CPython call) that Python's standard
library does not wrap.

Every ctypes call of the project belongs here, each with a fallback or a
clear OSError when the C library or the kernel lacks it.  The calls that
only make lsbd faster (fallocate, sync_file_range, the unzeroed bytearray,
mallopt) are looked up once, at import, and do nothing where they are
missing: they never change what lsbd stores.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Callable

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


def _function(name: str, argtypes: list, restype=ctypes.c_int):
    """libc's `name` with its signature set, or None where it is missing."""
    try:
        fn = getattr(_c(), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


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

PR_SET_PDEATHSIG = 1
PR_SET_IO_FLUSHER = 57


def set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG, sig): this process gets `sig` when the
    thread that started it ends (its process killed included)."""
    fn = _c().prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _check(fn(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def set_io_flusher() -> None:
    """prctl(PR_SET_IO_FLUSHER, 1): this process is in the I/O path (a loop
    device writes through it), so its allocations must not wait on writeback
    that needs it.  Needs CAP_SYS_RESOURCE; raises OSError without it."""
    fn = _c().prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _check(fn(PR_SET_IO_FLUSHER, 1, 0, 0, 0), "prctl(PR_SET_IO_FLUSHER)")


# -- fallocate(2) -------------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 1
_fallocate = _function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def preallocate(fd: int, length: int) -> None:
    """Reserve disk blocks for the first `length` bytes of a file without
    changing its size (fallocate with FALLOC_FL_KEEP_SIZE).  A failure (no
    support, a full disk) only loses the speed-up: writes then allocate as
    they go.  Without fallocate, does nothing."""
    if _fallocate is not None:
        _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, length)


def reserve(fd: int, length: int) -> None:
    """preallocate(), but a full disk raises OSError(ENOSPC): a new journal
    takes its whole segment's space up front, so that a full disk shows at
    the one place that can wait or evict for it.  No support: nothing."""
    if _fallocate is not None and _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, length) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSPC:
            raise OSError(err, "no space left on the cache dir's disk")


def sync_directory(path: str) -> None:
    """fsync a directory, which makes the names in it durable (the standard
    library syncs descriptors only)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_free(path: str) -> int:
    """Bytes an unprivileged process may still write on the file system of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- sync_file_range(2) -------------------------------------------------------

SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = _function("sync_file_range",
                             [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk and return without waiting
    (sync_file_range with SYNC_FILE_RANGE_WRITE).  Durability never rests on
    it: a failure, or its absence, only loses the head start."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


# -- posix_fadvise(WILLNEED) of a long range ------------------------------------------

#: POSIX_FADV_WILLNEED starts reading at most the device's read-ahead window
#: (read_ahead_kb, or its largest request if that is larger) per call,
#: whatever length it is given (mm/readahead.c, force_page_cache_ra): a
#: whole 64 MiB file advised at once had its first 8 MiB read here
#: (read_ahead_kb 8192, measured with fincore).  So a long range is
#: advised a piece at a time; no device lsbd runs on asks for less.
WILL_NEED_PIECE = 512 * 1024


def will_need(fd: int, start: int, length: int) -> None:
    """Have the kernel start reading all of [start, start+length) of a file
    now, asynchronously.  Only a hint: a failure is ignored."""
    end = start + length
    try:
        for offset in range(start, end, WILL_NEED_PIECE):
            os.posix_fadvise(fd, offset, min(WILL_NEED_PIECE, end - offset),
                             os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


# -- bytearray without zeroing (CPython) --------------------------------------

UNFILLED_FROM = 65536   # below this, zeroing costs less than the call


def _unfilled_bytearray_maker() -> Callable[[int], bytearray]:
    try:
        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:   # pragma: no cover - not CPython
        return bytearray
    make.restype = ctypes.py_object
    make.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    return lambda n: make(None, n) if n >= UNFILLED_FROM else bytearray(n)


#: unfilled_bytearray(n): a bytearray of n bytes that are not zeroed first,
#: for a buffer a read fills whole (zeroing 1 MiB cost 12 us, a quarter of
#: reading it from the page cache).  Elsewhere than CPython, bytearray(n).
unfilled_bytearray: Callable[[int], bytearray] = _unfilled_bytearray_maker()


# -- mallopt(3) (glibc) -------------------------------------------------------

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
_mallopt = _function("mallopt", [ctypes.c_int, ctypes.c_int])


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt; False where the C library is not glibc (its
    defaults then stand)."""
    if _mallopt is None:
        return False
    return bool(_mallopt(param, value))


_malloc_trim = _function("malloc_trim", [ctypes.c_size_t])


def malloc_trim() -> bool:
    """glibc's malloc_trim(0): hand the memory malloc holds free back to the
    kernel (a serving process keeps up to its trim threshold otherwise).
    False where the C library is not glibc."""
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


def anonymous_resident() -> int:
    """Bytes of this process's resident memory that no file backs (its heap,
    thread stacks, anonymous mappings): resident less shared, /proc/self/statm."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
