"""Helpers for the real-mount FUSE tests: run the CLI, mount and loop-mount,
make and compare trees of files, and always clean up (loop mounts, loop
devices, FUSE mounts, serving processes), even after a failed test or a
killed server."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lsbd_fuse.mounts import find_mount, read_pid_file

TOOLS = ("fusermount3", "mkfs.ext4", "e2fsck", "losetup", "mount", "umount", "findmnt")
REPO = Path(__file__).resolve().parent.parent.parent


def require_fuse(*tools: str) -> None:
    """Skip without root, /dev/fuse or the tools; in CI (CI=true) fail instead."""
    missing = [t for t in (*TOOLS, *tools) if shutil.which(t) is None]
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not root")
    if not os.path.exists("/dev/fuse"):
        reasons.append("no /dev/fuse")
    if missing:
        reasons.append("missing " + ", ".join(missing))
    if reasons:
        msg = "FUSE tests need " + "; ".join(reasons)
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def run(*cmd: str | os.PathLike, check: bool = True, timeout: float = 120,
        **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       check=False, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                             f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}")
    return r


def is_mounted(path: str | os.PathLike) -> bool:
    return find_mount(str(path)) is not None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class FuseEnv:
    """One test's store, cache dir and everything it mounted."""

    def __init__(self, tmp_path: Path, store_url: str):
        self.tmp = tmp_path
        self.store = store_url
        self.cache = tmp_path / "cache"
        self.fuse_mounts: list[Path] = []
        self.ext_mounts: list[Path] = []
        self.loops: list[str] = []
        self.pids: list[int] = []

    # --- the CLI -----------------------------------------------------------------

    def lsbd(self, *args: str | os.PathLike, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess:
        return run(sys.executable, "-m", "lsbd.cli.main", "--store", self.store,
                   "--cache-dir", self.cache, *args, check=check, timeout=timeout)

    def fake(self, mnt: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Mount a FakeVolume through the real front end (tests/support/fuse_fakes.py)."""
        mnt.mkdir(parents=True, exist_ok=True)
        self.fuse_mounts.append(mnt)
        r = run(sys.executable, REPO / "tests" / "support" / "fuse_fakes.py", mnt, *args, check=check)
        self._note_pid(mnt)
        return r

    def mount(self, volume: str, mnt: Path, *args: str, check: bool = True
              ) -> subprocess.CompletedProcess:
        mnt.mkdir(parents=True, exist_ok=True)
        self.fuse_mounts.append(mnt)
        r = self.lsbd("mount", volume, mnt, *args, check=check)
        self._note_pid(mnt)
        return r

    def _note_pid(self, mnt: Path) -> None:
        server = read_pid_file(str(mnt))
        if server is not None and server.pid not in self.pids:
            self.pids.append(server.pid)

    def server_pid(self, mnt: Path) -> int:
        server = read_pid_file(str(mnt))
        assert server is not None and server.alive(), f"no lsbd process serves {mnt}"
        return server.pid

    def remount(self, mnt: Path, *args: str, volume: str = "vol") -> None:
        """Unmount `mnt` and mount `volume` there again with `args` (e.g.
        `--read-only --direct-io` to read what the engine kept)."""
        self.umount(mnt)
        self.mount(volume, mnt, *args)

    def umount(self, mnt: Path) -> None:
        pid = read_pid_file(str(mnt))
        self.lsbd("umount", mnt, timeout=300)
        assert not is_mounted(mnt)
        if pid is not None:
            assert not alive(pid.pid), "lsbd umount returned before the server exited"

    # --- ext4 on a loop device ------------------------------------------------------

    def mounted_volume(self, size: str, mnt: Path, *create_args: str, volume: str = "vol"
                       ) -> Path:
        """A new volume of `size` (`lsbd create` with create_args) mounted at
        `mnt`; returns its image file."""
        self.lsbd("create", volume, "--size", size, *create_args)
        self.mount(volume, mnt)
        return mnt / f"{volume}.img"

    def ext4_volume(self, size: str, mnt: Path, ext: Path, volume: str = "vol"
                    ) -> tuple[Path, str]:
        """A new volume of `size` mounted at `mnt`, its image made ext4 and
        loop-mounted at `ext`: (the image, the loop device)."""
        image = self.mounted_volume(size, mnt, volume=volume)
        self.mkfs(image)
        return image, self.loop_mount(image, ext)

    def mkfs(self, image: Path) -> None:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", image, timeout=300)

    def loop_mount(self, image: Path, mnt: Path, *opts: str) -> str:
        """`mount -o loop` as a user would; returns the loop device."""
        mnt.mkdir(parents=True, exist_ok=True)
        run("mount", "-o", ",".join(("loop", *opts)), image, mnt)
        self.ext_mounts.append(mnt)
        dev = run("findmnt", "-n", "-o", "SOURCE", mnt).stdout.strip()
        self.loops.append(dev)
        return dev

    def loop_umount(self, mnt: Path) -> None:
        run("umount", mnt, timeout=300)

    # --- cleanup ----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Undo everything, most dependent first; never raises."""
        for mnt in reversed(self.ext_mounts):
            if is_mounted(mnt) and run("umount", mnt, check=False, timeout=60).returncode:
                run("umount", "-l", mnt, check=False, timeout=60)
        for dev in self.loops:
            if os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop"):
                run("losetup", "-d", dev, check=False, timeout=60)
        for mnt in reversed(self.fuse_mounts):
            if is_mounted(mnt) and run("fusermount3", "-u", mnt, check=False,
                                       timeout=60).returncode:
                run("fusermount3", "-u", "-z", mnt, check=False, timeout=60)
        deadline = time.monotonic() + 60
        for pid in self.pids:
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def dead_mount_cleanup(self, ext_mnt: Path, loop_dev: str, fuse_mnt: Path) -> None:
        """What a user does after the server died: lazy-unmount the file
        system on the loop device, detach the loop device, drop the dead
        FUSE mount."""
        run("umount", "-l", ext_mnt, timeout=60)
        run("losetup", "-d", loop_dev, check=False, timeout=60)
        run("fusermount3", "-u", "-z", fuse_mnt, timeout=60)
        assert not is_mounted(fuse_mnt)


@contextmanager
def fuse_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *tools: str,
             store_url: str | None = None) -> Iterator[FuseEnv]:
    """The body of a test's FuseEnv fixture: skip (fail in CI) without FUSE
    or `tools`, keep the mounts' pid files and logs in the test's own
    directory, use `store_url` (a file:// store in tmp_path by default), and
    clean up after the test."""
    require_fuse(*tools)
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    env = FuseEnv(tmp_path, store_url or "file://" + str(tmp_path / "store"))
    try:
        yield env
    finally:
        env.cleanup()


def zeroed(data: bytes, *ranges: tuple[int, int]) -> bytes:
    """`data` with each (offset, length) range made zeros: what reads give
    after those ranges were trimmed or zeroed."""
    out = bytearray(data)
    for offset, length in ranges:
        out[offset:offset + length] = bytes(length)
    return bytes(out)


# --- trees of files ------------------------------------------------------------------

def make_tree(root: Path, *, seed: int, large: int = 3, large_size: int = 12 << 20,
              small: int = 300) -> None:
    """Some large files, many small ones in nested directories, a few empty."""
    rnd = random.Random(seed)
    for i in range(large):
        path = root / "large" / f"big{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = large_size - rnd.randrange(0, 1 << 20)
        path.write_bytes(rnd.randbytes(size))
    for i in range(small):
        path = root / f"d{i % 7}" / f"e{i % 3}" / f"small{i}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rnd.randbytes(rnd.choice((0, 1, 100, 4095, 4096, 4097, 65536,
                                                   rnd.randrange(1, 200_000)))))


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel.startswith("lost+found"):
                continue
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def content(index: int, size: int) -> bytes:
    """Deterministic file content for the crash writer: file i is always the same."""
    return random.Random(index).randbytes(size)


# The crash test's writer: writes files f<i> (content(i, size)) into DIR
# forever, and after each one is closed appends "<i> <size>" to LOG (outside
# the mount, unbuffered).  A file listed in LOG before `sync` started must
# survive a crash of the server.
WRITER = r"""
import os, random, sys
d, log = sys.argv[1], sys.argv[2]
out = open(log, "a", buffering=1)
i = 0
while True:
    size = random.Random(i * 7919).randrange(1, 3 << 20)
    data = random.Random(i).randbytes(size)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(data)
    out.write(f"{i} {size}\n")
    i += 1
"""


def read_writer_log(log: Path) -> list[tuple[int, int]]:
    done = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            done.append((int(parts[0]), int(parts[1])))
    return done
