"""The FUSE front end.

Two tiers: the operations class driven directly (no kernel, no root), then
real mounts: mkfs.ext4 on the image, loop mounts, files copied, unmounted,
remounted from an empty cache dir, e2fsck clean; a server killed with
SIGKILL under load; online growth with resize2fs; fio with verification.
The real-mount tests need root and /dev/fuse; they skip without them, except
in CI (CI=true), where they fail.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

try:
    import pyfuse3
    import trio
except ImportError as e:  # the FUSE extra is not installed
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"the FUSE front end needs {e.name}", allow_module_level=True)

from fakes import FakeVolume
from fuse_helpers import (
    WRITER,
    FuseEnv,
    alive,
    content,
    is_mounted,
    make_tree,
    read_writer_log,
    require_fuse,
    run,
    tree_digest,
)
from lsbd_fuse.fs import ImageFS
from lsbd_fuse.mounts import find_mount, mount_table
from lsbd_fuse.options import MAX_BACKGROUND
from lsbd_fuse.tree import ROOT_INODE, Image

from lsbd.errors import CorruptionError, InvalidRequest, ReadOnlyError, StoreError

MiB = 1 << 20


# --- tier 1: the operations, no kernel -----------------------------------------------

def _fields(**set_) -> types.SimpleNamespace:
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
             "update_gid", "update_size")
    return types.SimpleNamespace(**{n: set_.get(n, False) for n in names})


def _size_attr(size: int) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_size = size
    return a


def _fs(**extra: Image) -> tuple[ImageFS, FakeVolume]:
    vol = FakeVolume("vol", 8 * MiB)
    return ImageFS({"vol.img": Image(device=vol), **extra}), vol


class BlockingVolume(FakeVolume):
    """A device that makes no promise not to block: its calls take no nowait."""

    supports_nowait = False

    def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        return super().read(offset, length)

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:  # type: ignore[override]
        super().write(offset, data, fua=fua)


def _where_calls_run(vol: FakeVolume, slow_from: int | None = None) -> list[tuple[str, bool]]:
    """Record (op, on the loop's thread) for every data call that gets as far
    as running; offsets from `slow_from` on are slow (a store fetch)."""
    seen: list[tuple[str, bool]] = []
    main = threading.get_ident()

    def delay_for(op, offset):
        slow = slow_from is not None and offset >= slow_from
        seen.append((op, threading.get_ident() == main))
        return 0.01 if slow else 0
    vol.delay_for = delay_for
    return seen


def _errno(exc_info) -> int:
    return exc_info.value.errno


async def _open(fs: ImageFS, path: bytes, flags: int = os.O_RDWR) -> int:
    inode = ROOT_INODE
    for part in path.split(b"/"):
        inode = (await fs.lookup(inode, part, None)).st_ino
    return (await fs.open(inode, flags, None)).fh


def test_ops_read_write_any_offset_and_the_end():
    fs, vol = _fs()

    async def main():
        fh = await _open(fs, b"vol.img")
        assert await fs.write(fh, 4093, b"abcdefgh") == 8           # across a block edge
        assert await fs.read(fh, 4090, 16) == b"\0\0\0abcdefgh\0\0\0\0\0"
        assert await fs.read(fh, 8 * MiB - 3, 100) == b"\0\0\0"     # short read at the end
        assert await fs.read(fh, 8 * MiB, 100) == b""               # EOF
        assert await fs.write(fh, 8 * MiB - 2, b"xyz") == 2         # short write at the end
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.write(fh, 8 * MiB, b"x")                       # a disk does not grow
        assert _errno(e) == errno.ENOSPC
        await fs.release(fh)

    trio.run(main)
    assert vol.read(8 * MiB - 2, 2) == b"xy"


def test_ops_only_grow_and_no_o_trunc():
    fs, vol = _fs()

    async def main():
        inode = (await fs.lookup(ROOT_INODE, b"vol.img", None)).st_ino
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.open(inode, os.O_WRONLY | os.O_TRUNC, None)    # dd without conv=notrunc
        assert _errno(e) == errno.EINVAL
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.setattr(inode, _size_attr(0), _fields(update_size=True), None, None)
        assert _errno(e) == errno.EINVAL
        same = await fs.setattr(inode, _size_attr(8 * MiB), _fields(update_size=True), None, None)
        assert same.st_size == 8 * MiB
        grown = await fs.setattr(inode, _size_attr(16 * MiB), _fields(update_size=True),
                                 None, None)
        assert grown.st_size == 16 * MiB
        assert (await fs.getattr(inode, None)).st_size == 16 * MiB
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.setattr(inode, _size_attr(0), _fields(update_mode=True), None, None)
        assert _errno(e) == errno.EPERM

    trio.run(main)
    assert vol.size == 16 * MiB


@pytest.mark.parametrize("exc, code", [
    (CorruptionError("bad crc", key="segments/x", offset=4096), errno.EIO),
    (StoreError("connection reset"), errno.EIO),
    (StoreError("no space", errno.ENOSPC), errno.ENOSPC),
    (StoreError("reset", errno.ECONNRESET), errno.EIO),
    (FileNotFoundError(errno.ENOENT, "a cache file vanished"), errno.EIO),
    (InvalidRequest("out of range"), errno.EINVAL),
    (ReadOnlyError("read-only"), errno.EROFS),
    (RuntimeError("a bug"), errno.EIO),
])
@pytest.mark.parametrize("device", [FakeVolume, BlockingVolume], ids=["inline", "worker"])
def test_ops_engine_errors_become_errno(exc, code, device):
    vol = device("vol", 8 * MiB)
    fs = ImageFS({"vol.img": Image(device=vol)})

    async def main():
        fh = await _open(fs, b"vol.img")
        vol.fail_next(exc)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.read(fh, 0, 4096)
        assert _errno(e) == code
        assert await fs.read(fh, 0, 4096) == bytes(4096)  # and the next request works

    trio.run(main)


def test_ops_read_only_images_and_directories():
    snap = FakeVolume("snap", 4 * MiB, read_only=True)
    fs, _vol = _fs(**{"snapshots/monday.img": Image(device=snap, read_only=True)})

    async def main():
        snaps = await fs.lookup(ROOT_INODE, b"snapshots", None)
        assert snaps.st_mode & 0o170000 == 0o040000
        entry = await fs.lookup(snaps.st_ino, b"monday.img", None)
        assert entry.st_size == 4 * MiB and entry.st_mode & 0o777 == 0o444
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.open(entry.st_ino, os.O_RDWR, None)
        assert _errno(e) == errno.EROFS
        fh = (await fs.open(entry.st_ino, os.O_RDONLY, None)).fh
        assert await fs.read(fh, 0, 10) == bytes(10)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.create(ROOT_INODE, b"new", 0o644, os.O_RDWR, None)
        assert _errno(e) == errno.EPERM

    trio.run(main)


def test_ops_flush_and_fsync():
    fs, vol = _fs()

    async def main():
        reader = await _open(fs, b"vol.img", os.O_RDONLY)
        await fs.flush(reader)                   # close(2) of a reader: nothing to make durable
        assert vol.calls["flush"] == 0
        writer = await _open(fs, b"vol.img", os.O_WRONLY)
        await fs.flush(writer)
        assert vol.calls["flush"] == 1
        await fs.fsync(reader, True)             # fsync is asked for: always a FLUSH
        assert vol.calls["flush"] == 2

    trio.run(main)


def test_ops_a_slow_engine_call_does_not_stall_the_others():
    slow = FakeVolume("slow", 4 * MiB)
    slow.delay_for = lambda op, offset: 1.0
    fs, _vol = _fs(**{"slow.img": Image(device=slow)})
    finished = []

    async def main():
        fast_fh = await _open(fs, b"vol.img")
        slow_fh = await _open(fs, b"slow.img")

        async def read(name, fh):
            await fs.read(fh, 0, 4096)
            finished.append(name)

        async with trio.open_nursery() as n:
            n.start_soon(read, "slow", slow_fh)
            await trio.sleep(0.05)
            for _ in range(20):
                n.start_soon(read, "fast", fast_fh)
        fs.stop_workers()

    trio.run(main)
    assert finished[-1] == "slow" and finished.count("fast") == 20



def test_ops_inline_when_the_device_promises_not_to_block():
    fs, vol = _fs()
    seen = _where_calls_run(vol)

    async def main():
        fh = await _open(fs, b"vol.img")
        assert await fs.write(fh, 4093, b"abcdefgh") == 8
        assert await fs.read(fh, 4090, 16) == b"\0\0\0abcdefgh\0\0\0\0\0"
        await fs.flush(fh)                        # a flush may wait: always a worker
        fs.stop_workers()

    trio.run(main)
    assert seen == [("write", True), ("read", True)]
    assert vol.calls["write"] == vol.calls["read"] == vol.calls["flush"] == 1


def test_ops_would_block_goes_to_a_worker():
    fs, vol = _fs()
    seen = _where_calls_run(vol, slow_from=4 * MiB)

    async def main():
        fh = await _open(fs, b"vol.img")
        assert await fs.write(fh, 4 * MiB + 10, b"slow") == 4
        assert await fs.write(fh, 10, b"fast") == 4
        assert await fs.read(fh, 4 * MiB + 8, 8) == b"\0\0slow\0\0"
        assert await fs.read(fh, 8, 8) == b"\0\0fast\0\0"
        fs.stop_workers()

    trio.run(main)
    # The first try on the loop does nothing; the worker does the call.
    assert seen == [("write", True), ("write", False), ("write", True),
                    ("read", True), ("read", False), ("read", True)]
    assert vol.calls["write"] == vol.calls["read"] == 2


def test_ops_devices_without_nowait_use_the_workers():
    vol = BlockingVolume("vol", 8 * MiB)
    fs = ImageFS({"vol.img": Image(device=vol)})
    seen = _where_calls_run(vol)

    async def main():
        fh = await _open(fs, b"vol.img")
        assert await fs.write(fh, 0, b"data") == 4
        assert await fs.read(fh, 0, 4) == b"data"
        fs.stop_workers()

    trio.run(main)
    assert seen == [("write", False), ("read", False)]


def test_ops_a_slow_store_fetch_does_not_stall_the_same_image():
    fs, vol = _fs()
    vol.delay_for = lambda op, offset: 1.0 if offset >= 4 * MiB else 0
    finished = []

    async def main():
        fh = await _open(fs, b"vol.img")

        async def io(name, off):
            if name.endswith("write"):
                await fs.write(fh, off, b"x" * 4096)
            else:
                await fs.read(fh, off, 4096)
            finished.append(name)

        async with trio.open_nursery() as n:
            n.start_soon(io, "slow read", 4 * MiB)
            n.start_soon(io, "slow write", 5 * MiB)
            await trio.sleep(0.05)
            for i in range(20):
                n.start_soon(io, "fast read", i * 4096)
                n.start_soon(io, "fast write", (100 + i) * 4096)
        fs.stop_workers()

    start = time.monotonic()
    trio.run(main)
    assert time.monotonic() - start < 1.8             # the slow calls ran side by side
    assert sorted(finished[-2:]) == ["slow read", "slow write"]
    assert finished.count("fast read") == finished.count("fast write") == 20

# --- tier 2: real mounts ---------------------------------------------------------------

@pytest.fixture
def fenv(tmp_path, monkeypatch):
    """A FuseEnv on a file:// store."""
    require_fuse()
    # Pid files and logs of these mounts go to the test's own directory.
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    env = FuseEnv(tmp_path, "file://" + str(tmp_path / "store"))
    yield env
    env.cleanup()


@pytest.fixture
def store_env(tmp_path, monkeypatch, store_url):
    """A FuseEnv on each store kind (file://, s3:// on the moto server)."""
    require_fuse()
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    env = FuseEnv(tmp_path, store_url)
    yield env
    env.cleanup()


@pytest.mark.fuse
def test_mounted_fake_behaves_like_a_disk_image(fenv):
    mnt = fenv.tmp / "mnt"
    fenv.fake(mnt, "--size", "64M", "--snapshot", "old")
    image = mnt / "vol.img"
    assert sorted(os.listdir(mnt)) == ["snapshots", "vol.img"]
    assert image.stat().st_size == 64 * MiB
    assert os.listdir(mnt / "snapshots") == ["old.img"]
    assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize == 128 * MiB

    fd = os.open(image, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"hello", 1000) == 5
        assert os.pread(fd, 7, 999) == b"\0hello\0"
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.pread(fd, 10, 64 * MiB) == b""
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 64 * MiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)

    # The gotchas: O_TRUNC (dd without conv=notrunc, `>`) and shrinking are refused.
    r = run("dd", "if=/dev/zero", f"of={image}", "bs=4k", "count=1", check=False)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    r = run("dd", "if=/dev/zero", f"of={image}", "bs=4k", "count=1", "seek=1",
            "conv=notrunc", check=False)
    assert r.returncode == 0, r.stderr
    with pytest.raises(OSError) as e:
        os.truncate(image, MiB)
    assert e.value.errno == errno.EINVAL
    os.truncate(image, 96 * MiB)
    assert image.stat().st_size == 96 * MiB
    with open(image, "rb") as f:
        f.seek(1000)
        assert f.read(5) == b"hello"                 # growing kept the data

    with pytest.raises(OSError) as e:
        (mnt / "other").write_bytes(b"x")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.open(mnt / "snapshots" / "old.img", os.O_RDWR)
    assert e.value.errno == errno.EROFS
    os.utime(image)                                  # touch works

    pid = fenv.server_pid(mnt)
    fenv.umount(mnt)
    assert not alive(pid)


@pytest.mark.fuse
def test_mounted_slow_fetch_does_not_stall_other_requests(fenv):
    """Requests the volume serves locally are answered while another one
    waits for the store (here: the fake's reads from 32 MiB on take 2 s)."""
    mnt = fenv.tmp / "mnt"
    fenv.fake(mnt, "--size", "64M", "--delay", "2", "--delay-from", "32M")
    fd = os.open(mnt / "vol.img", os.O_RDWR)
    try:
        slow = threading.Thread(target=os.pread, args=(fd, 4096, 32 * MiB))
        slow.start()
        time.sleep(0.2)
        start = time.monotonic()
        for i in range(200):
            assert os.pwrite(fd, b"%8d" % i, i * 4096) == 8
            assert os.pread(fd, 8, i * 4096) == b"%8d" % i
        assert time.monotonic() - start < 1.5
        assert slow.is_alive()                       # still waiting for its "store"
        slow.join(10)
        assert not slow.is_alive()
    finally:
        os.close(fd)
    fenv.umount(mnt)

@pytest.fixture
def fusectl():
    """The fusectl file system, mounted for the test if it is not already."""
    path = Path("/sys/fs/fuse/connections")
    mounted_here = False
    if not any(e.fstype == "fusectl" for e in mount_table()):
        if run("mount", "-t", "fusectl", "fusectl", path, check=False).returncode:
            pytest.skip("cannot mount fusectl")
        mounted_here = True
    yield path
    if mounted_here:
        run("umount", path, check=False)


@pytest.mark.fuse
def test_mount_raises_the_kernels_limit_on_requests_in_flight(fenv, fusectl):
    mnt = fenv.tmp / "mnt"
    fenv.fake(mnt, "--size", "16M")
    major, minor = (int(x) for x in find_mount(str(mnt)).major_minor.split(":"))
    conn = fusectl / str((major << 20) | minor)
    assert int((conn / "max_background").read_text()) == MAX_BACKGROUND > 16
    assert int((conn / "congestion_threshold").read_text()) == MAX_BACKGROUND * 3 // 4
    fenv.umount(mnt)

@pytest.mark.fuse
def test_mount_errors_are_one_clear_line(fenv):
    mnt = fenv.tmp / "mnt"
    fenv.lsbd("create", "vol", "--size", "64M")

    r = fenv.lsbd("mount", "vol", fenv.tmp / "missing", check=False)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"lsbd: mount point {fenv.tmp / 'missing'} does not exist"]
    r = fenv.lsbd("mount", "nosuch", mnt.parent, check=False)   # unknown volume
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1

    fenv.mount("vol", mnt)
    r = fenv.lsbd("mount", "vol", mnt, check=False)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"lsbd: {mnt} is busy: it is already an lsbd mount (pid {fenv.server_pid(mnt)})"]

    other = fenv.tmp / "other"
    other.mkdir()
    r = fenv.lsbd("mount", "vol", other, check=False)           # the lease is held
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by" in lines[0], r.stderr
    assert not is_mounted(other)

    r = fenv.lsbd("umount", other, check=False)
    assert r.returncode != 0 and "not mounted" in r.stderr

    loop = run("losetup", "-f", "--show", mnt / "vol.img").stdout.strip()
    fenv.loops.append(loop)
    r = fenv.lsbd("umount", mnt, check=False)                  # a loop device holds the image
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        (f"lsbd: {mnt} is busy: the image is still in use (a loop device or an open file); "
         "unmount that first, or use --lazy")]
    assert is_mounted(mnt)
    run("losetup", "-d", loop)
    fenv.umount(mnt)


@pytest.mark.fuse
def test_foreground_mount_and_stop_by_signal(fenv):
    fenv.lsbd("create", "vol", "--size", "64M")
    mnt = fenv.tmp / "mnt"
    mnt.mkdir()
    fenv.fuse_mounts.append(mnt)
    proc = subprocess.Popen([sys.executable, "-m", "lsbd.cli.main", "--store", fenv.store,
                             "--cache-dir", str(fenv.cache), "mount", "--foreground", "vol",
                             str(mnt)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "vol.img").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the foreground mount never came up"
            time.sleep(0.05)
        with open(mnt / "vol.img", "r+b") as f:
            f.write(b"written in the foreground")
        proc.send_signal(signal.SIGTERM)                 # stop: detach, flush, close
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not is_mounted(mnt)
    # The volume was closed cleanly: mounting again needs no takeover, and the data is there.
    fenv.mount("vol", mnt)
    with open(mnt / "vol.img", "rb") as f:
        assert f.read(25) == b"written in the foreground"
    fenv.umount(mnt)


@pytest.mark.fuse
def test_plain_umount_ends_the_server_cleanly(fenv):
    mnt = fenv.tmp / "mnt"
    fenv.fake(mnt, "--size", "16M")
    pid = fenv.server_pid(mnt)
    run("umount", mnt)                                 # not lsbd umount: the kernel's
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, "the server did not exit after umount"
        time.sleep(0.05)
    assert not is_mounted(mnt)


@pytest.mark.fuse
def test_read_only_mount(fenv):
    mnt = fenv.tmp / "mnt"
    fenv.lsbd("create", "vol", "--size", "64M")
    fenv.mount("vol", mnt)
    with open(mnt / "vol.img", "r+b") as f:
        f.seek(MiB)
        f.write(b"kept")
    fenv.umount(mnt)

    fenv.mount("vol", mnt, "--read-only")
    image = mnt / "vol.img"
    assert image.stat().st_mode & 0o777 == 0o444
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(4) == b"kept"
    with pytest.raises(OSError) as e:
        os.open(image, os.O_RDWR)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.truncate(image, 128 * MiB)
    assert e.value.errno == errno.EROFS
    fenv.umount(mnt)


@pytest.mark.fuse
def test_snapshots_and_past_states_mount_read_only(fenv):
    mnt = fenv.tmp / "mnt"
    fenv.lsbd("create", "vol", "--size", "64M")
    fenv.mount("vol", mnt)
    image = mnt / "vol.img"

    def put(text: bytes) -> None:
        with open(image, "r+b") as f:
            f.write(text)

    def get(path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read(6)

    put(b"first!")
    fenv.lsbd("snapshot", "create", "vol", "one")     # while mounted
    put(b"second")
    fenv.umount(mnt)

    fenv.mount("vol", mnt, "--with-snapshots")
    snap = mnt / "snapshots" / "one.img"
    assert get(image) == b"second" and get(snap) == b"first!"
    assert snap.stat().st_mode & 0o777 == 0o444
    with pytest.raises(OSError) as e:
        os.open(snap, os.O_RDWR)
    assert e.value.errno == errno.EROFS
    put(b"third!")                                     # the live image stays writable
    fenv.umount(mnt)

    fenv.mount("vol", mnt, "--snapshot", "one")
    assert os.listdir(mnt) == ["vol.img"] and get(image) == b"first!"
    with pytest.raises(OSError) as e:
        os.open(image, os.O_RDWR)
    assert e.value.errno == errno.EROFS
    fenv.umount(mnt)


@pytest.mark.fuse
def test_seed_workflow_survives_an_empty_cache_dir(store_env):
    """The issue's workflow: create, mount, mkfs.ext4, mount -o loop, copy a
    tree, unmount both, delete the cache dir, mount again: byte-identical,
    e2fsck clean."""
    env = store_env
    src, mnt, ext = env.tmp / "src", env.tmp / "mnt", env.tmp / "ext"
    make_tree(src, seed=1)
    want = tree_digest(src)

    env.lsbd("create", "vol", "--size", "1G")
    env.mount("vol", mnt)
    image = mnt / "vol.img"
    assert image.stat().st_size == 1 << 30
    env.mkfs(image)
    env.loop_mount(image, ext)
    run("cp", "-a", f"{src}/.", ext, timeout=300)
    env.loop_umount(ext)
    env.umount(mnt)

    shutil.rmtree(env.cache)
    env.mount("vol", mnt)
    run("e2fsck", "-fn", image, timeout=300)          # exit 0: clean
    env.loop_mount(image, ext, "ro")
    assert tree_digest(ext) == want
    env.loop_umount(ext)
    env.umount(mnt)


@pytest.mark.fuse
def test_sigkill_under_load_keeps_every_synced_file(store_env):
    fenv = store_env
    mnt, ext = fenv.tmp / "mnt", fenv.tmp / "ext"
    fenv.lsbd("create", "vol", "--size", "1G")
    fenv.mount("vol", mnt)
    image = mnt / "vol.img"
    fenv.mkfs(image)
    loop = fenv.loop_mount(image, ext)
    (ext / "w").mkdir()
    log = fenv.tmp / "written.log"
    log.touch()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ext / "w"), str(log)],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(read_writer_log(log)) < 20:
            assert writer.poll() is None, "the writer died"
            assert time.monotonic() < deadline, "the writer is too slow"
            time.sleep(0.05)
        synced = read_writer_log(log)                 # closed before sync started ...
        run("sync", timeout=120)                      # ... so durable once it returns
        time.sleep(0.3)                               # still writing
        assert writer.poll() is None
        server = fenv.server_pid(mnt)
        os.kill(server, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(60)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{server}") and time.monotonic() < deadline:
        time.sleep(0.05)                              # gone, and reaped

    r = fenv.lsbd("mount", "vol", mnt, check=False)   # says what to do with the dead mount
    assert r.returncode != 0 and f"fusermount3 -u -z {mnt}" in r.stderr, r.stderr
    fenv.dead_mount_cleanup(ext, loop, mnt)
    fenv.mount("vol", mnt)                           # replays the journal; takes the lease over
    # Replay the ext4 journal the way a user would (mount, unmount), then check.
    fenv.loop_mount(image, ext)
    fenv.loop_umount(ext)
    run("e2fsck", "-fn", image, timeout=300)
    fenv.loop_mount(image, ext, "ro")
    for index, size in synced:
        data = (ext / "w" / f"f{index}").read_bytes()
        assert data == content(index, size), f"synced file f{index} is damaged"
    fenv.loop_umount(ext)
    fenv.umount(mnt)


@pytest.mark.fuse
def test_truncate_grows_and_resize2fs_online(fenv):
    require_fuse("resize2fs")
    mnt, ext = fenv.tmp / "mnt", fenv.tmp / "ext"
    fenv.lsbd("create", "vol", "--size", "256M")
    fenv.mount("vol", mnt)
    image = mnt / "vol.img"
    fenv.mkfs(image)
    loop = fenv.loop_mount(image, ext)
    (ext / "before").write_bytes(os.urandom(MiB))
    before = os.statvfs(ext).f_blocks

    run("truncate", "-s", "768M", image)
    assert image.stat().st_size == 768 * MiB
    if _has_cap_sys_resource():
        run("losetup", "-c", loop)                     # the loop device learns the new size
        run("resize2fs", loop, timeout=300)            # online: ext4 stays mounted
    else:
        # ext4's online resize needs CAP_SYS_RESOURCE, which some containers
        # drop even for root: grow it offline instead (through the image).
        fenv.loop_umount(ext)
        run("e2fsck", "-fp", image, timeout=300)
        run("resize2fs", image, timeout=300)
        fenv.loop_mount(image, ext)
    after = os.statvfs(ext).f_blocks
    assert after > 2.5 * before
    payload = os.urandom(300 * MiB // 64) * 64         # more than the old size had free
    (ext / "after").write_bytes(payload)
    fenv.loop_umount(ext)
    fenv.umount(mnt)

    fenv.mount("vol", mnt)
    assert image.stat().st_size == 768 * MiB
    run("e2fsck", "-fn", image, timeout=300)
    fenv.loop_mount(image, ext, "ro")
    assert (ext / "after").read_bytes() == payload
    fenv.loop_umount(ext)
    fenv.umount(mnt)


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))  # CAP_SYS_RESOURCE
    return False


@pytest.mark.fuse
def test_fio_verify_on_the_image(fenv):
    require_fuse("fio")
    mnt = fenv.tmp / "mnt"
    fenv.lsbd("create", "vol", "--size", "512M")
    fenv.mount("vol", mnt)
    job = ["fio", "--name=verify", f"--filename={mnt / 'vol.img'}", "--direct=1",
           "--ioengine=libaio", "--iodepth=16", "--rw=randwrite", "--bsrange=4k-256k",
           "--size=192M", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=1",
           "--output-format=terse"]
    run(*job, timeout=300)                             # fio exits non-zero on a mismatch
    fenv.umount(mnt)
    # Again after a remount: the same job, only verifying what is stored.
    fenv.mount("vol", mnt)
    run(*job, "--verify_only", timeout=300)
    fenv.umount(mnt)


@pytest.mark.fuse
def test_ext4_on_a_snapshot_image_shows_the_past_while_the_live_volume_changes(fenv):
    """Snapshot an ext4 volume while it is mounted and busy; a read-only mount
    of the snapshot (mount -o ro,noload) shows the files as they were, while
    files keep changing on the live volume; a later read-write mount shows the
    snapshot as snapshots/NAME.img."""
    live_mnt, live_ext = fenv.tmp / "mnt", fenv.tmp / "ext"
    snap_mnt, snap_ext = fenv.tmp / "snap", fenv.tmp / "snapext"
    src = fenv.tmp / "src"
    make_tree(src, seed=7, large=1, large_size=4 << 20)
    before = tree_digest(src)

    fenv.lsbd("create", "vol", "--size", "256M")
    fenv.mount("vol", live_mnt)
    image = live_mnt / "vol.img"
    fenv.mkfs(image)
    fenv.loop_mount(image, live_ext)
    run("cp", "-a", f"{src}/.", live_ext)
    run("sync")
    fenv.lsbd("snapshot", "create", "vol", "s1")             # through the running writer

    # The live volume changes: files removed, rewritten, added.
    shutil.rmtree(live_ext / next(p.name for p in src.iterdir() if p.is_dir()))
    (live_ext / "new-after-snapshot.txt").write_text("only in the live volume\n")
    run("sync")

    fenv.mount("vol", snap_mnt, "--snapshot", "s1")          # no lease needed: read-only
    fenv.loop_mount(snap_mnt / "vol.img", snap_ext, "ro,noload")
    assert tree_digest(snap_ext) == before
    assert not (snap_ext / "new-after-snapshot.txt").exists()
    (live_ext / "more.txt").write_text("the live volume keeps changing\n")
    run("sync")
    assert tree_digest(snap_ext) == before
    fenv.loop_umount(snap_ext)
    fenv.umount(snap_mnt)

    assert (live_ext / "new-after-snapshot.txt").exists()
    fenv.loop_umount(live_ext)
    fenv.umount(live_mnt)

    # A read-write mount shows the snapshot next to the live image.
    fenv.mount("vol", live_mnt)
    assert os.listdir(live_mnt / "snapshots") == ["s1.img"]
    fenv.loop_mount(live_mnt / "snapshots" / "s1.img", snap_ext, "ro,noload")
    assert tree_digest(snap_ext) == before
    fenv.loop_umount(snap_ext)
    fenv.umount(live_mnt)
