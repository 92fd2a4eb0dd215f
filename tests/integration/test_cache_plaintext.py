"""Plaintext never reaches the cache dir or the store of an encrypted volume
(#13): known text written through NBD (nbdcopy) and through FUSE (the
image file, and a file inside an ext4 made on it), flushed, then every
file under the cache dir and the store searched for it, while the volume
is served (journals, segments waiting to upload, the map) and after it
stopped.  On a plain volume the same search finds the text: the test can
fail."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from fuse_helpers import FuseEnv, require_fuse
from nbd_helpers import LsbdStore, require_tools, run_tool

MiB = 1 << 20
BS = 4096
#: 64 bytes that appear nowhere else; each block adds its number, so no two
#: blocks are equal and none is all zeros.
MARK = b"LSBD-PLAINTEXT-SEARCH:3b9d0c7e-21f4-4a8e-b6d2-95c1e0f7a4d8-NBD!!"
EXT4_MARK = b"LSBD-PLAINTEXT-SEARCH:ext4-file-contents-7c2e9a41-d5b3-40f6-8ee!"
assert len(MARK) == len(EXT4_MARK) == 64

SETTINGS = {True: ("--encrypt",), False: ("--compress", "none")}


def marked(mark: bytes, nblocks: int) -> bytes:
    return b"".join((mark * (BS // 64))[:BS - 8] + struct.pack("<Q", i) for i in range(nblocks))


def holding(root, needle: bytes) -> list[str]:
    """Every file under `root` that contains `needle`."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(os.path.relpath(path, root))
            except OSError:
                pass   # removed meanwhile (an upload's scratch file)
    return found


def check(root: Path, needle: bytes, encrypted: bool, *, where: str) -> None:
    cache, store = holding(root / "cache", needle), holding(root / "store", needle)
    if encrypted:
        assert cache == [] and store == [], f"{where}: plaintext in {cache + store}"
    else:
        assert cache, f"{where}: the search cannot see the plain volume's text"


@pytest.mark.nbd
@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_nbd_writes_leave_no_plaintext(tmp_path, monkeypatch, encrypted):
    require_tools("nbdcopy")
    monkeypatch.setenv("LSBD_PASSPHRASE", "plaintext search passphrase")
    env = LsbdStore(str(tmp_path))
    env.create("v", "32M", "--segment-size", "1M", *SETTINGS[encrypted])
    image = tmp_path / "marked.img"
    image.write_bytes(marked(MARK, 4 * MiB // BS))
    with env.serve("v") as srv:
        run_tool("nbdcopy", str(image), srv.uri("v"))     # ends with a FLUSH
        check(tmp_path, MARK, encrypted, where="served")
        image.unlink()                                     # not part of the search
        out = tmp_path / "out.img"
        run_tool("nbdcopy", srv.uri("v"), str(out))
        assert out.read_bytes()[:4 * MiB] == marked(MARK, 4 * MiB // BS)
        out.unlink()
    check(tmp_path, MARK, encrypted, where="stopped")
    if not encrypted:
        assert holding(tmp_path / "store", MARK)


@pytest.mark.fuse
@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_fuse_writes_and_ext4_files_leave_no_plaintext(tmp_path, monkeypatch, encrypted):
    require_fuse("mkfs.ext4")
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("LSBD_PASSPHRASE", "plaintext search passphrase")
    fenv = FuseEnv(tmp_path, "file://" + str(tmp_path / "store"))
    try:
        mnt, ext = tmp_path / "mnt", tmp_path / "ext"
        img = fenv.mounted_volume("64M", mnt, "--segment-size", "1M", *SETTINGS[encrypted])
        fenv.mkfs(img)
        fenv.loop_mount(img, ext)
        (ext / "file.bin").write_bytes(marked(EXT4_MARK, 2 * MiB // BS))
        os.sync()
        fenv.loop_umount(ext)
        # Straight into the image too, past what ext4 used.
        fd = os.open(img, os.O_RDWR)
        try:
            os.pwrite(fd, marked(MARK, MiB // BS), 60 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        for needle in (MARK, EXT4_MARK):
            check(tmp_path, needle, encrypted, where="mounted")
        fenv.umount(mnt)
        for needle in (MARK, EXT4_MARK):
            check(tmp_path, needle, encrypted, where="unmounted")
    finally:
        fenv.cleanup()
