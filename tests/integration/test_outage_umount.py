"""A store outage at unmount (issue #16), through a real FUSE mount of an S3
volume (moto over HTTP behind a proxy the test cuts): `lsbd umount
--timeout 10` returns within about 10 s and says what waits in the cache dir
and that the next mount uploads it; the serving process is gone by then,
leaving no pid file or temporary folder; once the store is back, the next
mount uploads the rest and everything reads back, also on another machine."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from engine_helpers import MiB
from fault_helpers import CuttableProxy, wait_until
from fuse_helpers import FuseEnv, alive, is_mounted, require_fuse
from lsbd_fuse.mounts import pid_path, read_pid_file


@pytest.fixture
def outage_env(tmp_path, moto_server, s3_bucket, monkeypatch):
    require_fuse()
    proxy = CuttableProxy(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    env = FuseEnv(tmp_path, f"s3://{s3_bucket}/outage")
    yield env, proxy
    proxy.set_cut(False)
    env.cleanup()
    proxy.close()


def _write(image, written: dict, first: int, count: int, *, sync: bool) -> None:
    fd = os.open(image, os.O_RDWR)
    try:
        for i in range(first, first + count):
            data = os.urandom(MiB)
            assert os.pwrite(fd, data, i * MiB) == MiB
            written[i] = data
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _pending(env: FuseEnv) -> int:
    r = env.lsbd("stats", "vol", "--json", check=False, timeout=60)
    return json.loads(r.stdout)["uploads_pending"] if r.returncode == 0 else -1


def _upload_error(env: FuseEnv) -> str | None:
    r = env.lsbd("stats", "vol", "--json", check=False, timeout=60)
    return json.loads(r.stdout).get("upload_error") if r.returncode == 0 else None


@pytest.mark.fuse
@pytest.mark.parametrize("stop", ["umount --timeout 10", "umount --timeout 3", "SIGTERM"])
def test_stop_during_an_outage(outage_env, tmp_path, stop):
    """Flush mode journal: fsyncs go on during the outage.  (In mode store an
    fsync, and the close(2) of a written image, wait for the store and fail
    with EIO after 120 s: nothing flushed waits in the cache dir.)

    --timeout 10 races the process's own bound (it stops waiting once
    uploads have failed for 10 s); --timeout 3 comes first, so its SIGTERM
    is what stops the wait.  SIGTERM without lsbd umount: the process
    detaches the mount, stops within its bound and logs what waits."""
    env, proxy = outage_env
    env.lsbd("create", "vol", "--size", "64M", "--segment-size", "1M")
    mnt = tmp_path / "mnt"
    env.mount("vol", mnt)
    image = mnt / "vol.img"
    written: dict[int, bytes] = {}
    _write(image, written, 0, 4, sync=True)          # in the store
    server = read_pid_file(str(mnt))
    pid = server.pid

    proxy.set_cut(True)                               # the store is down
    _write(image, written, 4, 4, sync=True)
    if stop != "SIGTERM":
        # The umount must name the error the uploads met: wait until one has
        # (on a busy machine the segments may not even be sealed yet).
        assert wait_until(lambda: _upload_error(env), timeout=60), \
            "no upload failed while the store was down"

    started = time.monotonic()
    if stop == "SIGTERM":
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not alive(pid), timeout=30), "SIGTERM did not stop it"
        took = time.monotonic() - started
        assert took < 25, f"SIGTERM during an outage took {took:.1f}s"
        log = open(server.log).read()
        assert "got SIGTERM: stopping" in log, log
        assert "segments" in log and "upload on the next open" in log, log
    else:
        timeout = int(stop.rsplit(" ", 1)[1])
        r = env.lsbd("umount", mnt, "--timeout", str(timeout), check=False, timeout=120)
        took = time.monotonic() - started
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert took < timeout + 8, f"lsbd {stop} took {took:.1f}s: {r.stderr}"
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        last = lines[-1]
        assert "segments" in last and "cache dir" in last and "next mount uploads" in last, last
        assert "last upload error" in last, last
        assert wait_until(lambda: not alive(pid), timeout=10), "the serving process is there"
        if timeout < 10:
            log = open(server.log).read()
            assert "got SIGTERM while closing: no longer waiting for the store" in log, log
    print(f"{stop} during the outage: {took:.1f}s")
    assert not is_mounted(mnt)
    assert not os.path.exists(pid_path(str(mnt)))
    assert not [d for d, _, _ in os.walk(env.cache) if "-ro-" in d]

    # The store is back: the next mount uploads what waited.
    proxy.set_cut(False)
    env.mount("vol", mnt)
    assert wait_until(lambda: _pending(env) == 0, timeout=60)
    fd = os.open(image, os.O_RDONLY)
    try:
        for i, data in written.items():
            assert os.pread(fd, MiB, i * MiB) == data, f"MiB {i}"
    finally:
        os.close(fd)
    r = env.lsbd("umount", mnt, "--timeout", "60", check=False, timeout=120)
    assert r.returncode == 0 and "next mount" not in r.stderr, r.stderr

    # Another machine reads it all from the store alone.
    env.cache = tmp_path / "other-cache"
    out = tmp_path / "out"
    env.lsbd("export", "vol", out)
    with open(out, "rb") as f:
        for i, data in sorted(written.items()):
            f.seek(i * MiB)
            assert f.read(MiB) == data, f"MiB {i} from the store"
    assert env.lsbd("verify", "vol", check=False).returncode == 0
