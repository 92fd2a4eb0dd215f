"""The image's page cache (the default cache mode) keeps the rules of
docs/fuse.md, tested through real mounts: what a reader sees is what the
engine holds (a TRIM or zeroing through the same open file drops the cached
range; a new open reads the engine), a write has reached the engine when it
returns, and a shared writable mapping works and is durable once synced.
`--direct-io` gives the old mode.  Needs root and /dev/fuse (fails in CI
without).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import signal
import time

import pytest
from fuse_helpers import alive, fuse_env, run, zeroed

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on an open descriptor, as a loop device calls it for a
    TRIM (os.posix_fallocate takes no mode)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.fixture
def fenv(tmp_path, monkeypatch):
    with fuse_env(tmp_path, monkeypatch) as env:
        yield env


def _is_direct_io(fd: int) -> bool:
    """A shared writable mapping of a FOPEN_DIRECT_IO file fails (ENODEV)."""
    try:
        mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
    except OSError:
        return True
    return False


@pytest.mark.fuse
def test_trim_and_zeroing_through_one_open_file_drop_the_cached_range(fenv):
    """A loop device keeps the image open and sends TRIM as fallocate on
    that open file: what it reads next must be the zeros, not the cache."""
    mnt = fenv.tmp / "mnt"
    image = fenv.mounted_volume("64M", mnt)
    data = os.urandom(8 * MiB)
    fd = os.open(image, os.O_RDWR)
    try:
        assert not _is_direct_io(fd)                      # the page cache is the default
        os.pwrite(fd, data, 0)
        assert os.pread(fd, 8 * MiB, 0) == data           # now in the image's page cache
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, MiB)
        _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 3 * MiB, 2 * MiB)
        _fallocate(fd, FALLOC_FL_ZERO_RANGE, 6 * MiB + 8192, 4096)
        want = zeroed(data, (4096, MiB), (3 * MiB, 2 * MiB), (6 * MiB + 8192, 4096))
        assert os.pread(fd, 8 * MiB, 0) == want
    finally:
        os.close(fd)
    fenv.remount(mnt, "--read-only", "--direct-io")      # the engine's own data
    with open(image, "rb") as f:
        assert _is_direct_io(f.fileno())
        assert f.read(8 * MiB) == want
    fenv.umount(mnt)


@pytest.mark.fuse
def test_writes_reach_the_engine_when_they_return(fenv):
    """Writes are written through: after the serving process is killed,
    the next mount sees every write that returned, with no fsync at all
    (the journal in the cache dir holds them)."""
    mnt = fenv.tmp / "mnt"
    image = fenv.mounted_volume("64M", mnt)
    data = os.urandom(4 * MiB)
    fd = os.open(image, os.O_RDWR)
    os.pwrite(fd, data, 0)
    os.pwrite(fd, b"x" * 1000, 10 * MiB + 512)            # not whole pages
    pid = fenv.server_pid(mnt)
    os.kill(pid, signal.SIGKILL)        # no fsync, not even a close (it would flush)
    try:
        os.close(fd)
    except OSError:
        pass                            # the server is gone
    run("fusermount3", "-u", "-z", mnt, timeout=60)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    fenv.mount("vol", mnt, "--direct-io")                # replays the journal
    with open(image, "rb") as f:
        assert f.read(4 * MiB) == data
        f.seek(10 * MiB)
        assert f.read(2048) == bytes(512) + b"x" * 1000 + bytes(536)
    fenv.umount(mnt)


@pytest.mark.fuse
def test_a_shared_writable_mapping_is_durable_once_synced(fenv):
    mnt = fenv.tmp / "mnt"
    image = fenv.mounted_volume("64M", mnt)
    data = os.urandom(2 * MiB)
    fd = os.open(image, os.O_RDWR)
    try:
        with mmap.mmap(fd, 4 * MiB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[MiB:3 * MiB] = data
            m.flush()                                     # msync: written back to the engine
        os.fsync(fd)
    finally:
        os.close(fd)
    fenv.remount(mnt, "--read-only", "--direct-io")
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == data
    fenv.umount(mnt)


@pytest.mark.fuse
def test_direct_io_mode_on_request(fenv):
    mnt = fenv.tmp / "mnt"
    fenv.lsbd("create", "vol", "--size", "16M")
    fenv.mount("vol", mnt, "--direct-io")
    image = mnt / "vol.img"
    with open(image, "r+b", buffering=0) as f:
        assert _is_direct_io(f.fileno())
        f.write(b"y" * 4096)
        f.seek(0)
        assert f.read(4096) == b"y" * 4096
    fenv.umount(mnt)


def _readahead_kb(mnt) -> int:
    """The read-ahead the kernel gives the files of the FUSE mount at `mnt`
    (its bdi is named by the mount's device number)."""
    with open("/proc/self/mountinfo") as f:
        device = [line.split()[2] for line in f if line.split()[4] == str(mnt)][-1]
    with open(f"/sys/class/bdi/{device}/read_ahead_kb") as f:
        return int(f.read())


@pytest.mark.fuse
def test_the_image_reads_ahead_as_much_as_asked(fenv):
    """The kernel offers 128 KiB and INIT can only lower it: a mount raises
    it to 4 MiB by default, or to --readahead, and lowers it too."""
    mnt = fenv.tmp / "mnt"
    fenv.mounted_volume("16M", mnt)
    assert _readahead_kb(mnt) == 4096
    for asked, kib in (("1M", 1024), ("64K", 64), ("0", 0)):
        fenv.remount(mnt, "--readahead", asked)
        assert _readahead_kb(mnt) == kib, asked
    fenv.umount(mnt)
