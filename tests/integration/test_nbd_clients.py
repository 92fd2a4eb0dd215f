"""Real NBD clients against `lsbd serve` over a local store: nbdinfo,
nbdcopy, qemu-img, qemu-io, fio's nbd engine, libnbd's Python binding and
nbdfuse with ext4 on top; clean restarts and SIGKILL crashes in between."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from nbd_helpers import (LsbdStore, libnbd_python, require_libnbd_python, require_root,
                         require_tools, run_tool, short_tempdir, wait_for)

pytestmark = pytest.mark.nbd

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path):
    return LsbdStore(str(tmp_path))


def random_image(path: str, size: int, *, holes: list[tuple[int, int]] = ()) -> None:
    """A file of random bytes with zeroed ranges (real holes) in it."""
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        for start, length in sorted(holes) + [(size, 0)]:
            while pos < start:
                n = min(8 * MiB, start - pos)
                f.seek(pos)
                f.write(os.urandom(n))
                pos += n
            pos = start + length


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


# --- discovery --------------------------------------------------------------------


def test_nbdinfo_lists_every_volume_and_maps_holes(env):
    require_tools("nbdinfo", "qemu-io")
    env.create("alpha", "256M")
    env.create("beta", "64M")
    with env.serve("alpha", "beta") as srv:
        listing = json.loads(run_tool("nbdinfo", "--list", "--json", srv.uri()).stdout)
        exports = {e["export-name"]: e for e in listing["exports"]}
        assert set(exports) == {"alpha", "beta"}
        assert exports["alpha"]["export-size"] == 256 * MiB
        assert exports["beta"]["export-size"] == 64 * MiB
        for e in exports.values():
            assert (e["block_size_minimum"], e["block_size_preferred"],
                    e["block_size_maximum"]) == (1, 4096, 32 * MiB)
            assert e["can_multi_conn"] and e["can_flush"] and e["can_fua"]
            assert e["can_trim"] and e["can_zero"] and e["can_fast_zero"]
            assert "base:allocation" in e["contexts"]

        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c",
                 "write -P 0x11 100M 4k", srv.uri("alpha"))
        extents = json.loads(run_tool("nbdinfo", "--map", "--json", srv.uri("alpha")).stdout)
        data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
        holes = [(e["offset"], e["length"]) for e in extents if e["type"] == 3]
        assert data == [(MiB, 64 * 1024), (100 * MiB, 4096)]
        assert sum(length for _, length in holes) == 256 * MiB - 64 * 1024 - 4096
        # The default export is the first volume.
        assert json.loads(run_tool("nbdinfo", "--json", srv.uri()).stdout)[
            "exports"][0]["export-size"] == 256 * MiB
        assert srv.stop() == 0


# --- copies in and out ------------------------------------------------------------


def test_nbdcopy_and_qemu_img_round_trips(env, tmp_path):
    require_tools("nbdcopy", "qemu-img", "nbdinfo")
    size = 256 * MiB
    holes = [(32 * MiB, 16 * MiB), (200 * MiB, 40 * MiB)]
    source = str(tmp_path / "source.img")
    random_image(source, size, holes=holes)
    digest = sha256(source)
    env.create("copy", "256M")
    env.create("qemu", "256M")
    with env.serve("copy", "qemu") as srv:
        # nbdcopy in and out.
        run_tool("nbdcopy", source, srv.uri("copy"), timeout=180)
        back = str(tmp_path / "nbdcopy-back.img")
        run_tool("nbdcopy", srv.uri("copy"), back, timeout=180)
        assert sha256(back) == digest
        # The zero ranges were not stored as data, and copying out skipped them.
        extents = json.loads(run_tool("nbdinfo", "--map", "--json", srv.uri("copy")).stdout)
        hole_bytes = sum(e["length"] for e in extents if e["type"] & 1)
        assert hole_bytes >= 56 * MiB
        assert allocated_bytes(back) <= size - 56 * MiB + MiB
        os.unlink(back)

        # qemu-img convert in and out.
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", "-n", source,
                 srv.uri("qemu"), timeout=180)
        back = str(tmp_path / "qemu-back.img")
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("qemu"), back,
                 timeout=180)
        assert sha256(back) == digest
        assert allocated_bytes(back) <= size - 56 * MiB + MiB
        os.unlink(back)
        assert srv.stop() == 0

    # After a clean restart (a fresh cache dir, even) the data is all there.
    shutil.rmtree(env.cache)
    with env.serve("copy", options=("--read-only",)) as srv:
        back = str(tmp_path / "after-restart.img")
        run_tool("nbdcopy", srv.uri("copy"), back, timeout=180)
        assert sha256(back) == digest


def test_qemu_io_writes_at_odd_offsets(env):
    require_tools("qemu-io")
    env.create("odd", "64M")
    writes = [(1, 513, 0xAB), (4095, 2, 0xCD), (5000, 3, 0x01), (MiB - 7, 4096 + 13, 0x77),
              (64 * MiB - 1, 1, 0xEE)]
    with env.serve("odd") as srv:
        run_tool("qemu-io", "-f", "raw", *sum(
            (["-c", f"write -P {pat:#x} {off} {n}"] for off, n, pat in writes), []),
            srv.uri("odd"))
        # A new connection (no client cache) reads every pattern back, and
        # the bytes around them are still zero.
        result = run_tool("qemu-io", "-f", "raw", *sum(
            (["-c", f"read -P {pat:#x} {off} {n}"] for off, n, pat in writes), []),
            "-c", "read -P 0 0 1", "-c", "read -P 0 514 3581", "-c", "read -P 0 4097 903",
            srv.uri("odd"))
        assert "fail" not in result.stdout.lower(), result.stdout
        assert srv.stop() == 0


# --- fio -----------------------------------------------------------------------------


def test_fio_random_writes_verify(env):
    require_tools("fio")
    env.create("fio", "128M")
    with env.serve("fio") as srv:
        result = run_tool(
            "fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri('fio')}",
            "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64M", "--offset=32M",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
            "--verify_state_save=0",     # no state file in the working directory
            "--output-format=json", timeout=240)
        report = json.loads(result.stdout[result.stdout.index("{"):])
        job = report["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["total_ios"] == 64 * MiB // 4096
        assert job["read"]["total_ios"] == 64 * MiB // 4096       # every block verified
        # fio leaves without NBD_CMD_DISC: the server takes that as a normal close.
        time.sleep(0.2)
        assert srv.proc.poll() is None
        assert "ERROR" not in srv.stderr()
        assert srv.stop() == 0


# --- MULTI_CONN durability across a crash ------------------------------------------

_TWO_WRITERS = r"""
import sys, nbd
uri = sys.argv[1]
chunk = 256 * 1024
handles = [nbd.NBD(), nbd.NBD()]
for h in handles:
    h.connect_uri(uri)
    assert h.can_multi_conn()
# Two connections write disjoint ranges at the same time (asynchronous
# requests on both handles before waiting for any).
cookies = []
for i, h in enumerate(handles):
    base = i * 32 * 1024 * 1024
    for n in range(32 * 1024 * 1024 // chunk):
        buf = nbd.Buffer.from_bytearray(bytearray(bytes([i + 1, n % 256]) * (chunk // 2)))
        cookies.append((h, h.aio_pwrite(buf, base + n * chunk)))
while any(h.aio_in_flight() for h in handles):
    for h in handles:
        if h.aio_in_flight():
            h.poll(1)
for h, cookie in cookies:
    assert h.aio_command_completed(cookie)   # raises if the write failed
# One FLUSH, on the second connection only, covers both.
handles[1].flush()
print("flushed", flush=True)
sys.stdin.read()
"""

_CHECK = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
chunk = 256 * 1024
bad = 0
for i in range(2):
    base = i * 32 * 1024 * 1024
    for n in range(32 * 1024 * 1024 // chunk):
        if h.pread(chunk, base + n * chunk) != bytes([i + 1, n % 256]) * (chunk // 2):
            bad += 1
print(bad)
"""


def test_flush_on_one_connection_survives_sigkill(env):
    require_libnbd_python()
    env.create("multi", "128M")
    # Flush mode "store": a FLUSH returns once the data is in the store, so
    # the store alone must hold both connections' writes after the crash.
    srv = env.serve("multi", options=("--flush-mode", "store"))
    writers = subprocess.Popen(["/usr/bin/python3", "-c", _TWO_WRITERS, srv.uri("multi")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert writers.stdout.readline().strip() == "flushed"
        srv.kill()                                  # crash with both clients connected
    finally:
        writers.kill()
        writers.wait()
    shutil.rmtree(env.cache)                        # and the local disk is lost too
    with env.serve("multi", options=("--break-lease",)) as srv:
        assert libnbd_python(_CHECK, srv.uri("multi")).stdout.strip() == "0"
        assert srv.stop() == 0


# --- nbdfuse + ext4 ----------------------------------------------------------------


class NbdFuse:
    """The export as a file (MNT/disk) through nbdfuse, no kernel NBD needed."""

    def __init__(self, uri: str):
        self.mnt = short_tempdir()
        self.pidfile = os.path.join(self.mnt + ".pid")
        self.proc = subprocess.Popen(["nbdfuse", "-P", self.pidfile,
                                      os.path.join(self.mnt, "disk"), uri],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for(lambda: os.path.exists(self.pidfile) or self.proc.poll() is not None):
            raise AssertionError("nbdfuse did not start")
        if self.proc.poll() is not None:
            raise AssertionError(f"nbdfuse failed: {self.proc.stderr.read()}")
        self.disk = os.path.join(self.mnt, "disk")

    def close(self) -> None:
        run_tool("fusermount3", "-u", self.mnt)
        self.proc.wait(60)
        os.rmdir(self.mnt)
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)


def _write_tree(root: str) -> dict[str, str]:
    digests = {}
    for d in range(4):
        os.makedirs(os.path.join(root, f"dir{d}"))
        for f in range(8):
            path = os.path.join(root, f"dir{d}", f"file{f}")
            data = os.urandom((d * 8 + f + 1) * 37 * 1024)
            with open(path, "wb") as fh:
                fh.write(data)
            digests[os.path.relpath(path, root)] = hashlib.sha256(data).hexdigest()
    return digests


def _check_tree(root: str, digests: dict[str, str]) -> None:
    for rel, digest in digests.items():
        with open(os.path.join(root, rel), "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digest, rel


def test_ext4_on_nbdfuse_is_clean_after_a_restart(env):
    require_tools("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "mount", "umount")
    require_root()
    env.create("fs", "256M")
    mountpoint = short_tempdir()
    try:
        with env.serve("fs") as srv:
            fuse = NbdFuse(srv.uri("fs"))
            try:
                run_tool("mkfs.ext4", "-q", "-F", fuse.disk)
                run_tool("mount", "-o", "loop", fuse.disk, mountpoint)
                try:
                    digests = _write_tree(mountpoint)
                    os.remove(os.path.join(mountpoint, "dir0", "file3"))   # frees (TRIM)
                    del digests[os.path.join("dir0", "file3")]
                    run_tool("fstrim", mountpoint, check=False)
                finally:
                    run_tool("umount", mountpoint)
            finally:
                fuse.close()
            assert srv.stop() == 0

        with env.serve("fs") as srv:
            fuse = NbdFuse(srv.uri("fs"))
            try:
                fsck = run_tool("e2fsck", "-fn", fuse.disk, check=False)
                assert fsck.returncode == 0, fsck.stdout + fsck.stderr
                run_tool("mount", "-o", "loop,ro", fuse.disk, mountpoint)
                try:
                    _check_tree(mountpoint, digests)
                finally:
                    run_tool("umount", mountpoint)
            finally:
                fuse.close()
            assert srv.stop() == 0
    finally:
        os.rmdir(mountpoint)


# --- the command itself ---------------------------------------------------------------


def test_serve_over_tcp_and_stop_on_sigint(env):
    require_tools("nbdinfo", "qemu-io")
    env.create("tcp", "32M")
    with env.serve("tcp", options=("--port", "0")) as srv:
        m = re.fullmatch(r"lsbd: serving tcp on nbd://127\.0\.0\.1:(\d+)/tcp", srv.ready_line)
        assert m, srv.ready_line
        uri = f"nbd://127.0.0.1:{m.group(1)}/tcp"
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", uri)
        info = json.loads(run_tool("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["export-size"] == 32 * MiB
        assert srv.stop(signal.SIGINT) == 0
        assert "flushed and closed" in srv.stderr()
    with env.serve("tcp", options=("--read-only", "--port", "0")) as srv:
        port = re.search(r":(\d+)/tcp$", srv.ready_line).group(1)
        uri = f"nbd://127.0.0.1:{port}/tcp"
        info = json.loads(run_tool("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["is_read_only"]
        run_tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x42 0 1M", uri)
        denied = run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x1 0 4k", uri, check=False)
        assert denied.returncode != 0 or "denied" in denied.stdout + denied.stderr.lower() \
            or "read-only" in (denied.stdout + denied.stderr).lower()
        assert srv.stop() == 0


def test_serve_reports_user_errors_in_one_line(env):
    env.create("taken", "32M")
    with env.serve("taken") as srv:
        # A second writer is refused (the lease), with one line and no traceback.
        second = env.run("serve", "taken", "--socket", srv.socket_path + "2", check=False)
        assert second.returncode == 1
        assert second.stderr.startswith("lsbd: ") and "Traceback" not in second.stderr
        assert srv.stop() == 0
    missing = env.run("serve", "nope", "--port", "0", check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


def test_corrupt_store_data_is_an_io_error_for_that_request(env):
    require_tools("qemu-io")
    # Plain segments, damaged in place (compressed and encrypted ones:
    # tests/engine/test_encrypted_volume.py).
    env.create("bad", "16M", "--compress", "none")
    with env.serve("bad") as srv:
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4M", srv.uri("bad"))
        assert srv.stop() == 0
    # Damage the middle (the data) of every segment in the store, and drop
    # the local cache so that reads must come from the store.
    seg_dir = os.path.join(env.store, "volumes", "bad", "seg")
    for name in os.listdir(seg_dir):
        path = os.path.join(seg_dir, name)
        size = os.path.getsize(path)
        if size > 1 * MiB:
            with open(path, "r+b") as f:
                f.seek(size // 2)
                f.write(b"\xff" * 4096)
    shutil.rmtree(env.cache)
    with env.serve("bad", options=("--read-only",)) as srv:
        failed = run_tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 0 4M",
                          srv.uri("bad"), check=False)
        assert "Input/output error" in failed.stdout + failed.stderr
        # The server logged it, and still serves the rest of the volume.
        assert wait_for(lambda: "ERROR" in srv.stderr(), timeout=5), srv.stderr()
        run_tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 8M 1M", srv.uri("bad"))
        assert srv.stop() == 0
