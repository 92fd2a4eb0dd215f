"""The FUSE front end.

Real mounts (the server without a kernel: test_fuse_protocol.py): mkfs.ext4
on the image, loop mounts, files copied, unmounted, remounted from an empty
cache dir, e2fsck clean; a server killed with SIGKILL under load; online
growth with resize2fs; fio with verification; TRIM end to end.
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
from pathlib import Path

import pytest
from fuse_helpers import (
    WRITER,
    fuse_env,
    alive,
    content,
    is_mounted,
    make_tree,
    read_writer_log,
    require_fuse,
    run,
    tree_digest,
)
from lsbd_fuse.mounts import find_mount, mount_table, read_pid_file
from lsbd_fuse.options import MAX_BACKGROUND

MiB = 1 << 20


# --- real mounts -----------------------------------------------------------------------

@pytest.fixture
def fenv(tmp_path, monkeypatch):
    """A FuseEnv on a file:// store."""
    with fuse_env(tmp_path, monkeypatch) as env:
        yield env


@pytest.fixture
def store_env(tmp_path, monkeypatch, store_url):
    """A FuseEnv on each store kind (file://, s3:// on the moto server)."""
    with fuse_env(tmp_path, monkeypatch, store_url=store_url) as env:
        yield env


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
def test_umount_timeout_stops_a_close_stuck_elsewhere(fenv):
    """A close that waits for something other than uploads (the fake's close
    sleeps): `lsbd umount --timeout` returns in time; its SIGTERM stops the
    process at once, with a line in its log, leaving no pid file.  (Waiting
    for uploads of a real volume: tests/integration/test_outage_umount.py.)"""
    mnt = fenv.tmp / "mnt"
    fenv.fake(mnt, "--size", "16M", "--close-delay", "600", "--snapshot", "old")
    server = read_pid_file(str(mnt))
    start = time.monotonic()
    r = fenv.lsbd("umount", mnt, "--timeout", "2", check=False)
    assert time.monotonic() - start < 10
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "was stopped" in lines[0] and "next mount uploads" in lines[0]
    assert not is_mounted(mnt)
    assert not alive(server.pid)
    log = Path(server.log).read_text()
    assert "closed old" in log                          # read-only images close first
    assert "got SIGTERM while closing: stopping now" in log
    assert read_pid_file(str(mnt)) is None


@pytest.mark.fuse
def test_read_only_mount(fenv):
    mnt = fenv.tmp / "mnt"
    image = fenv.mounted_volume("64M", mnt)
    with open(image, "r+b") as f:
        f.seek(MiB)
        f.write(b"kept")
    fenv.umount(mnt)

    fenv.mount("vol", mnt, "--read-only")
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
    image = fenv.mounted_volume("64M", mnt)

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

    image, _loop = env.ext4_volume("1G", mnt, ext)
    assert image.stat().st_size == 1 << 30
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
    # Room for the writer while a slow sync runs (a loaded machine, the s3 store).
    image, loop = fenv.ext4_volume("2G", mnt, ext)
    (ext / "w").mkdir()
    log = fenv.tmp / "written.log"
    log.touch()
    errors = fenv.tmp / "writer.err"
    with open(errors, "w") as err:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ext / "w"), str(log)],
                                  stderr=err)

    def died() -> str:
        return f"the writer died: {errors.read_text()[-500:]}"

    try:
        deadline = time.monotonic() + 60
        while len(read_writer_log(log)) < 20:
            assert writer.poll() is None, died()
            assert time.monotonic() < deadline, "the writer is too slow"
            time.sleep(0.05)
        synced = read_writer_log(log)                 # closed before sync started ...
        run("sync", timeout=120)                      # ... so durable once it returns
        time.sleep(0.3)                               # still writing
        assert writer.poll() is None, died()
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
    image, loop = fenv.ext4_volume("256M", mnt, ext)
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
    image = fenv.mounted_volume("512M", mnt)
    job = ["fio", "--name=verify", f"--filename={image}", "--direct=1",
           "--ioengine=libaio", "--iodepth=16", "--rw=randwrite", "--bsrange=4k-256k",
           "--size=192M", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=1",
           "--verify_state_save=0", "--output-format=terse"]
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

    image, _loop = fenv.ext4_volume("256M", live_mnt, live_ext)
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
