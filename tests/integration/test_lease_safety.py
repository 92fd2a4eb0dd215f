"""--break-lease is safe (issue #16): it never takes a lease from a live
process on this machine, and taken from another machine it fences the old
writer off: its next write fails with a clear error, it uploads nothing over
the new writer's history, and the volume stays clean.

Two machines are stood for by two cache dirs and two host names (LSBD_HOST)."""

from __future__ import annotations

import os
import socket

import pytest
from engine_helpers import BS, MiB, assert_user_error, block, open_test_store
from fault_helpers import Machine, wait_until

from lsbd.engine import testing
from lsbd import names
from lsbd.meta.config import create_volume
from lsbd.meta.lease import read_holder
from lsbd.engine.volume import Volume
from lsbd.errors import LeaseHeld, LeaseLost, StoreError


def test_break_lease_never_takes_it_from_this_process(tmp_path, store_url):
    store = open_test_store(store_url)
    create_volume(store, "vol", 16 * MiB)
    first = Volume.open(store, "vol", cache_root=str(tmp_path / "a"))
    try:
        for flag in (False, True):
            with pytest.raises(LeaseHeld) as info:
                Volume.open(store, "vol", cache_root=str(tmp_path / "b"), break_lease=flag)
            assert "--break-lease" not in str(info.value) or "never" in str(info.value)
            assert f"pid {os.getpid()}" in str(info.value)
        first.write(0, block(1, 0))
        first.flush()
        assert read_holder(store, "vol").token == testing.lease_holder(first).token
    finally:
        first.close()
        store.close()


@pytest.mark.parametrize("flush_mode", ["journal", "store"])
def test_two_machines_break_lease(tmp_path, store_url, flush_mode):
    """Machine A serves the volume.  From A, delete/checkpoint --break-lease
    do not break it; from B, --break-lease fences A off."""
    store = open_test_store(store_url)
    create_volume(store, "vol", 16 * MiB, flush_mode=flush_mode)
    a = Machine("machine-a", tmp_path / "a", store_url)
    a2 = Machine("machine-a", tmp_path / "a-other-cache", store_url)
    b = Machine("machine-b", tmp_path / "b", store_url)
    served = a.serve("vol")
    try:
        client = served.client()
        client.write(0, block(1, 0))
        client.write(BS, block(2, 1))
        assert client.try_flush() == 0

        # This machine, even with --break-lease: refused, naming the process.
        for m in (a, a2):
            line = assert_user_error(m.run("delete", "vol", "--break-lease"))
            assert f"pid {served.pid}" in line and "umount" in line, line
            assert "add --break-lease" not in line, line
        line = assert_user_error(a2.run("checkpoint", "vol", "--break-lease"))
        assert f"pid {served.pid}" in line and "umount" in line, line
        assert "if that writer is gone" not in line and "add --break-lease" not in line, line
        # From the writer's own cache dir a checkpoint goes through the
        # writer (and uploads everything).
        assert a.run("checkpoint", "vol").returncode == 0
        assert store.exists(names.config_key("vol"))
        assert read_holder(store, "vol").pid == served.pid

        # Another machine: the message offers --break-lease, which works.
        line = assert_user_error(b.run("checkpoint", "vol"))
        assert f"pid {served.pid} on machine-a" in line and "--break-lease" in line, line
        assert b.run("checkpoint", "vol", "--break-lease").returncode == 0

        # A's next store contact fences it: in store mode the next flush,
        # in journal mode the next upload or lease check (seal interval,
        # LEASE_CHECK_INTERVAL); from then on every write fails.
        def fenced() -> bool:
            return client.try_write(2 * BS, block(3, 2)) != 0 or client.try_flush() != 0

        assert wait_until(fenced, timeout=40, interval=0.5), "the old writer was not fenced"
        assert client.try_write(3 * BS, block(4, 3)) != 0
        # The writer logs it as it fails the request: the line reaches our
        # reader of its stderr a moment after the client sees the error.
        assert wait_until(lambda: any("lease was broken" in x for x in served.lines),
                          timeout=30), served.stderr()
    finally:
        served.stop()
    # A writes nothing after the break; the volume reads what B found, clean.
    assert b.run("verify", "vol").returncode == 0
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "r"), read_only=True)
    try:
        assert vol.read(0, 2 * BS) == block(1, 0) + block(2, 1)
        assert vol.read(3 * BS, BS) == bytes(BS)
    finally:
        vol.close()
        store.close()


def test_fenced_writer_stops_at_its_next_upload(tmp_path, store_url, monkeypatch):
    """In-process: B breaks A's lease; A's next upload is refused (LeaseLost),
    nothing of A's after the break reaches the store, and it says so."""
    store = open_test_store(store_url)
    create_volume(store, "vol", 16 * MiB, flush_mode="store")
    monkeypatch.setenv("LSBD_HOST", "machine-a")
    old = Volume.open(store, "vol", cache_root=str(tmp_path / "a"))
    try:
        old.write(0, block(1, 0))
        old.flush()
        monkeypatch.setenv("LSBD_HOST", "machine-b")
        new = Volume.open(store, "vol", cache_root=str(tmp_path / "b"), break_lease=True)
        try:
            old.write(BS, block(2, 1))       # into A's journal
            with pytest.raises(StoreError) as info:
                old.flush()                  # A's upload: fenced
            assert isinstance(info.value, LeaseLost), info.value
            assert "machine-b" in str(info.value)
            with pytest.raises(LeaseLost):
                old.write(2 * BS, block(3, 2))
            new.write(4 * BS, block(5, 4))
            new.flush()                      # B's segment 2 is B's
        finally:
            new.close()
    finally:
        old.close()
    assert not store.exists(names.lease_key("vol"))
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "r"), read_only=True)
    try:
        assert vol.read(0, 5 * BS) == block(1, 0) + bytes(3 * BS) + block(5, 4)
    finally:
        vol.close()
        store.close()


def test_this_host_name_is_in_the_lease(tmp_path, store_url, monkeypatch):
    store = open_test_store(store_url)
    create_volume(store, "vol", 16 * MiB)
    monkeypatch.delenv("LSBD_HOST", raising=False)
    with Volume.open(store, "vol", cache_root=str(tmp_path / "a")):
        assert read_holder(store, "vol").host == socket.gethostname()
    store.close()


@pytest.mark.fuse
def test_two_machines_break_lease_on_a_fuse_mount(tmp_path, store_url, monkeypatch):
    """The same with the volume mounted through FUSE (flush mode store, so
    the fence shows at the next fsync): from this machine --break-lease is
    refused naming the mount's process; from another it fences the mount,
    whose next fsync fails with EIO, and verify stays clean."""
    import errno

    from fuse_helpers import FuseEnv, require_fuse
    from lsbd_fuse.mounts import read_pid_file

    require_fuse()
    monkeypatch.setenv("LSBD_HOST", "machine-a")
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    env = FuseEnv(tmp_path, store_url)
    env.cache = tmp_path / "a"
    a2 = Machine("machine-a", tmp_path / "a-other-cache", store_url)
    b = Machine("machine-b", tmp_path / "b", store_url)
    mnt = tmp_path / "mnt"
    try:
        env.lsbd("create", "vol", "--size", "16M", "--flush-mode", "store")
        env.mount("vol", mnt)
        server = read_pid_file(str(mnt))
        fd = os.open(mnt / "vol.img", os.O_RDWR)
        try:
            os.pwrite(fd, block(1, 0), 0)
            os.fsync(fd)
            for args in (("delete", "vol", "--break-lease"),
                         ("checkpoint", "vol", "--break-lease"),
                         ("snapshot", "delete", "vol", "s1")):
                line = assert_user_error(a2.run(*args))
                assert f"pid {server.pid}" in line and "umount" in line, line
                assert "if that writer is gone" not in line and "add --break-lease" not in line, line
            assert b.run("checkpoint", "vol", "--break-lease").returncode == 0

            os.pwrite(fd, block(2, 1), BS)
            with pytest.raises(OSError) as info:
                os.fsync(fd)                 # the upload finds the lease gone
            assert info.value.errno == errno.EIO
            with pytest.raises(OSError):
                os.pwrite(fd, block(3, 2), 2 * BS)
        finally:
            try:
                os.close(fd)                 # its flush fails too: the volume is fenced
            except OSError:
                pass
        env.lsbd("umount", mnt, check=False, timeout=180)
        assert wait_until(lambda: "lease was broken" in open(server.log).read(), timeout=10)
    finally:
        env.cleanup()
    assert b.run("verify", "vol").returncode == 0
    store = open_test_store(store_url)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "r"), read_only=True)
    try:
        assert vol.read(0, 3 * BS) == block(1, 0) + bytes(2 * BS)
    finally:
        vol.close()
        store.close()
