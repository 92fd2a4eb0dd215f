"""A full cache disk (issue #16).  The cache dir is on a small tmpfs the test
mounts.  With the store up, writing three times the disk's size through NBD
(flushing as it goes) succeeds: uploaded segments are evicted to make room.
With the store down, writes fail cleanly with ENOSPC once the disk is full
and the wait bound passes, and everything acknowledged reads back once the
store returns."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time

import pytest
from engine_helpers import MiB, assert_user_error, run_cli, segment_seqs
from fault_helpers import Client, CuttableProxy, wait_until
from nbd_helpers import running_server

from lsbd.engine.volume import Volume
from lsbd.meta.config import create_volume
from lsbd.store import open_store
from lsbd_nbd import protocol as p

DISK = 48 * MiB
SEGMENT = 2 * MiB


def _chunk(tag: int, i: int) -> bytes:
    return random.Random(tag * 100003 + i).randbytes(MiB)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    path = tmp_path / "disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(path)],
                   check=True)
    yield str(path)
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def s3(moto_server, s3_bucket):
    proxy = CuttableProxy(moto_server)
    store = open_store(f"s3://{s3_bucket}/disk", endpoint_url=proxy.url)
    yield store, proxy
    proxy.set_cut(False)
    store.close()
    proxy.close()


def test_three_times_the_disk_through_nbd(small_disk, s3):
    store, proxy = s3
    create_volume(store, "vol", 512 * MiB, segment_size=SEGMENT)
    vol = Volume.open(store, "vol", cache_root=small_disk, cache_full_wait=3.0)
    acked: dict[int, bytes] = {}
    try:
        with running_server({"vol": vol}) as server:
            c = Client(server.connect())
            c.sock.settimeout(60)
            c.connect_export("vol")
            total = 3 * DISK // MiB
            for i in range(total):                      # the store is up
                data = _chunk(1, i)
                c.write(i * MiB, data)
                acked[i] = data
                if i % 4 == 3:
                    assert c.try_flush() == 0
            assert c.try_flush() == 0
            stats = vol.usage()
            assert stats["cache_disk_free"] > 0
            assert stats["cache_bytes"] <= DISK

            proxy.set_cut(True)                         # the store is down
            failed_at = None
            started = time.monotonic()
            for i in range(total, 2 * total):
                data = _chunk(2, i - total)
                error = c.try_write(i * MiB, data)
                if error:
                    assert error == p.ENOSPC, error
                    failed_at = i
                    break
                acked[i] = data
                assert c.try_flush() == 0
            assert failed_at is not None, "the disk never filled"
            assert time.monotonic() - started < 120
            # Still refused while the store is down, after the bound (3 s) each time.
            t = time.monotonic()
            assert c.try_write(failed_at * MiB, _chunk(3, 0)) == p.ENOSPC
            assert 2.5 < time.monotonic() - t < 20
            for i in sorted(acked)[-5:]:                # what was acknowledged reads back
                assert c.read(i * MiB, MiB) == acked[i]

            proxy.set_cut(False)                        # the store is back
            assert wait_until(lambda: vol.usage()["uploads_pending"] == 0, timeout=120)
            c.write(failed_at * MiB, _chunk(4, 0))
            acked[failed_at] = _chunk(4, 0)
            assert c.try_flush() == 0
            for i, data in sorted(acked.items()):
                assert c.read(i * MiB, MiB) == data, f"MiB {i}"
            c.disconnect()
    finally:
        vol.close()
    assert not [n for n in os.listdir(small_disk) if "-ro-" in n]
    # And from the store alone.
    reader = Volume.open(store, "vol", cache_root=small_disk, read_only=True)
    try:
        for i, data in sorted(acked.items()):
            assert reader.read(i * MiB, MiB) == data, f"MiB {i} from the store"
    finally:
        reader.close()


def test_three_times_the_disk_through_fuse(small_disk, tmp_path, monkeypatch):
    """The same through a FUSE mount of the image file, fsyncing as it goes:
    the store (file://, on another file system) takes what the disk cannot."""
    from fuse_helpers import FuseEnv, require_fuse

    require_fuse()
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    env = FuseEnv(tmp_path, "file://" + str(tmp_path / "store"))
    env.cache = small_disk
    try:
        env.lsbd("create", "vol", "--size", "256M", "--segment-size", "2M")
        mnt = tmp_path / "mnt"
        env.mount("vol", mnt)
        image = mnt / "vol.img"
        total = 3 * DISK // MiB
        fd = os.open(image, os.O_RDWR)
        try:
            for i in range(total):
                assert os.pwrite(fd, _chunk(5, i), i * MiB) == MiB
                if i % 4 == 3:
                    os.fsync(fd)
            os.fsync(fd)
            for i in range(total):
                assert os.pread(fd, MiB, i * MiB) == _chunk(5, i), f"MiB {i}"
        finally:
            os.close(fd)
        env.umount(mnt)
    finally:
        env.cleanup()
    out = tmp_path / "out"
    env.cache = str(tmp_path / "other-cache")
    env.lsbd("export", "vol", out)
    with open(out, "rb") as f:
        for i in range(total):
            assert f.read(MiB) == _chunk(5, i), f"MiB {i} from the store"


def test_the_disk_fills_through_fuse_with_the_store_down(small_disk, tmp_path, moto_server,
                                                         s3_bucket, monkeypatch):
    """A FUSE mount of an S3 volume with `--cache-full-wait 2`: three times the
    disk with fsyncs while the store is up; with it down, a write fails with
    ENOSPC once the disk is full, 2 s after it started waiting, each time;
    everything acknowledged reads back, and once the store is back writes go
    on and the store alone holds it all."""
    from fuse_helpers import FuseEnv, require_fuse

    require_fuse()
    proxy = CuttableProxy(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    env = FuseEnv(tmp_path, f"s3://{s3_bucket}/disk")
    env.cache = small_disk
    acked: dict[int, bytes] = {}
    total = 3 * DISK // MiB
    try:
        env.lsbd("create", "vol", "--size", "512M", "--segment-size", "2M")
        mnt = tmp_path / "mnt"
        env.mount("vol", mnt, "--cache-full-wait", "2")
        fd = os.open(mnt / "vol.img", os.O_RDWR)
        try:
            for i in range(total):                      # the store is up
                assert os.pwrite(fd, _chunk(6, i), i * MiB) == MiB
                acked[i] = _chunk(6, i)
                if i % 4 == 3:
                    os.fsync(fd)
            os.fsync(fd)

            proxy.set_cut(True)                         # the store is down
            failed_at = None
            for i in range(total, 2 * total):
                try:
                    done = os.pwrite(fd, _chunk(7, i), i * MiB)
                    os.fsync(fd)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    failed_at = i
                    break
                if done < MiB:                          # a short write: the rest failed
                    failed_at = i
                    break
                acked[i] = _chunk(7, i)
            assert failed_at is not None, "the disk never filled"
            for _ in range(2):                          # refused after the bound each time
                t = time.monotonic()
                with pytest.raises(OSError) as info:
                    os.pwrite(fd, _chunk(8, 0), failed_at * MiB)
                assert info.value.errno == errno.ENOSPC
                assert 1.5 < time.monotonic() - t < 15
            for i in range(total, failed_at):           # what waits for upload reads back
                assert os.pread(fd, MiB, i * MiB) == acked[i], f"MiB {i}"

            proxy.set_cut(False)                        # the store is back
            assert wait_until(lambda: _uploads_pending(env) == 0, timeout=120)
            assert os.pwrite(fd, _chunk(8, 0), failed_at * MiB) == MiB
            acked[failed_at] = _chunk(8, 0)
            os.fsync(fd)
            for i, data in sorted(acked.items()):       # and everything else, evicted or not
                assert os.pread(fd, MiB, i * MiB) == data, f"MiB {i}"
        finally:
            os.close(fd)
        r = env.lsbd("umount", mnt, "--timeout", "120", check=False, timeout=180)
        assert r.returncode == 0, r.stderr
    finally:
        env.cleanup()
        proxy.close()
    assert not [n for n in os.listdir(small_disk) if "-ro-" in n]
    env.cache = tmp_path / "other-cache"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    out = tmp_path / "out"
    env.lsbd("export", "vol", out, timeout=300)
    with open(out, "rb") as f:
        for i, data in sorted(acked.items()):
            f.seek(i * MiB)
            assert f.read(MiB) == data, f"MiB {i} from the store"


def _uploads_pending(env) -> int:
    r = env.lsbd("stats", "vol", "--json", check=False, timeout=60)
    return json.loads(r.stdout)["uploads_pending"] if r.returncode == 0 else -1


def test_a_map_commit_that_finds_the_disk_full_waits_for_room(tmp_path, monkeypatch):
    """Something else on the cache disk (a sealing scratch file, a
    checkpoint's scratch map) may hold its last free bytes for a moment, and
    the map's commit of a sealed segment then fails with ENOSPC.  The sealer
    waits for room and commits again: the volume goes on taking writes (it
    used to stop, and every later write failed with EIO)."""
    from lsbd.map.blockmap import BlockMap

    store = open_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", 64 * MiB, segment_size=SEGMENT)
    real = BlockMap.apply_segment
    refused: list[int] = []

    def full_for_a_moment(self, info, records, **meta):
        if self.path.endswith(os.sep + "map") and len(refused) < 3:
            refused.append(info.seq)
            raise OSError(errno.ENOSPC, f"the map {self.path}: no space left on its disk")
        return real(self, info, records, **meta)

    monkeypatch.setattr(BlockMap, "apply_segment", full_for_a_moment)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    try:
        for i in range(8):
            vol.write(i * MiB, _chunk(9, i))
        vol.flush()
        # Each sealed segment is uploaded once the map has it.
        assert wait_until(lambda: len(segment_seqs(store, "vol")) == 4, timeout=60)
        assert refused == [1, 1, 1]
        vol.write(8 * MiB, _chunk(9, 8))                # still taking writes
        vol.flush()
        for i in range(9):
            assert vol.read(i * MiB, MiB) == _chunk(9, i), f"MiB {i}"
    finally:
        vol.close()
    reader = Volume.open(store, "vol", cache_root=str(tmp_path / "other-cache"), read_only=True)
    try:
        for i in range(9):
            assert reader.read(i * MiB, MiB) == _chunk(9, i), f"MiB {i} from the store"
    finally:
        reader.close()


def test_a_disk_smaller_than_a_segment_fails_at_once_saying_so(small_disk, tmp_path):
    """No upload or eviction can make room for a journal larger than the
    whole disk: the write fails now, naming the sizes and the way out,
    rather than after the wait for room (30 s) with '0 segments wait'."""
    store = open_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", 256 * MiB, segment_size=64 * MiB)
    vol = Volume.open(store, "vol", cache_root=small_disk)
    try:
        began = time.monotonic()
        with pytest.raises(OSError) as failed:
            vol.write(0, _chunk(1, 0))
        assert failed.value.errno == errno.ENOSPC
        assert time.monotonic() - began < 10
        assert "smaller than a segment needs" in str(failed.value)
        assert "--segment-size" in str(failed.value)
    finally:
        vol.close()


def test_the_command_says_it_in_one_line(small_disk, tmp_path):
    """`lsbd import` onto such a disk: the engine logs the refusal (a
    serving process's log needs it) and the command ends with the same
    words; they are shown once."""
    url = "file://" + str(tmp_path / "store")
    image = tmp_path / "data.raw"
    image.write_bytes(_chunk(2, 0) * 4)
    run_cli("create", "vol", "--size", "64M", "--segment-size", "64M", store=url,
            cache=small_disk, check=True)
    line = assert_user_error(run_cli("import", "vol", image, store=url, cache=small_disk),
                             "smaller than a segment needs")
    assert line.startswith("lsbd: ERROR: volume vol: the cache dir's disk")
