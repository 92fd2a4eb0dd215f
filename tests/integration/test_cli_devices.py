"""`lsbd import` and `lsbd export` with block devices (a loop device made by
the test) and with disk images of other formats."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import struct

import pytest
from engine_helpers import MiB, run_cli


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def _one_line_error(proc) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lsbd: "), proc.stderr
    return lines[0]


@pytest.fixture
def cli(tmp_path):
    store = tmp_path / "store"
    store.mkdir()

    def run(*args):
        return run_cli(*args, store=f"file://{store}", cache=tmp_path / "cache")

    return run


def _sha(path, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left is None or left > 0:
            chunk = f.read(MiB if left is None else min(MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


@pytest.fixture
def loop_device(tmp_path):
    """make(size) -> /dev/loopN over a file of that size; detached at the end."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        msg = "loop devices need root and losetup"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    devices = []

    def make(size: int, fill: bytes | None = None) -> str:
        backing = tmp_path / f"loop-{len(devices)}.img"
        with open(backing, "wb") as f:
            if fill is None:
                f.truncate(size)
            else:
                f.write(fill * (size // len(fill)))
        dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], check=False)


def _data(size: int) -> bytes:
    """Data with holes: zeros, random runs, a non-zero tail."""
    out = bytearray(size)
    for start in range(0, size, 3 * MiB):
        out[start:start + 256 * 1024] = os.urandom(256 * 1024)
    out[-4096:] = b"\xab" * 4096
    return bytes(out)


def test_import_from_and_export_to_a_block_device(cli, loop_device, tmp_path):
    """Round trip through loop devices, byte for byte: import a 32 MiB device
    into a 32 MiB volume; export onto a 64 MiB device, which keeps its last
    32 MiB untouched (never truncated), and whose holes get zeros even where
    the device held other bytes."""
    size = 32 * MiB
    data = _data(size)
    src = loop_device(size)
    with open(src, "r+b") as f:
        f.write(data)
    _ok(cli("create", "v", "--size", "32M"))
    out = json.loads(_ok(cli("import", "v", src, "--json")).stdout)
    assert out["bytes"] == size
    info = json.loads(_ok(cli("info", "v", "--json")).stdout)
    assert info["stored_bytes"] < 8 * MiB, "zero blocks of the device became data"

    dst = loop_device(64 * MiB, fill=b"\x5a" * 4096)     # not zeros: holes must be written
    _ok(cli("export", "v", dst))
    with open(dst, "rb") as f:
        assert f.read(size) == data
        assert f.read() == b"\x5a" * (32 * MiB), "export wrote past the volume's end"

    # And back in, from the larger device, is refused (it does not fit).
    _ok(cli("create", "w", "--size", "32M"))
    line = _one_line_error(cli("import", "w", dst))
    assert "larger than" in line and dst in line


def test_export_to_a_device_too_small_is_refused(cli, loop_device):
    _ok(cli("create", "v", "--size", "16M"))
    dst = loop_device(8 * MiB, fill=b"\x11" * 4096)
    line = _one_line_error(cli("export", "v", dst))
    assert dst in line and "too small" in line
    with open(dst, "rb") as f:
        assert f.read() == b"\x11" * (8 * MiB), "a refused export wrote to the device"


def test_export_to_dev_full_says_what_failed(cli):
    _ok(cli("create", "v", "--size", "1M"))
    line = _one_line_error(cli("export", "v", "/dev/full"))
    assert "/dev/full" in line and "No space left" in line and "writing" in line


def _qcow2() -> bytes:
    return b"QFI\xfb" + struct.pack(">I", 3) + bytes(504)


def _vmdk() -> bytes:
    return b"KDMV" + bytes(508)


def _vhdx() -> bytes:
    return b"vhdxfile" + bytes(504)


def _vhd_fixed() -> bytes:
    return bytes(64 * 1024) + b"conectix" + bytes(504)


def _vdi() -> bytes:
    head = bytearray(512)
    head[:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    head[0x40:0x44] = b"\x7f\x10\xda\xbe"
    return bytes(head)


@pytest.mark.parametrize("kind,make", [("qcow2", _qcow2), ("vmdk", _vmdk), ("vhdx", _vhdx),
                                       ("vpc", _vhd_fixed), ("vdi", _vdi)])
def test_known_image_formats_are_refused_unless_raw(cli, tmp_path, kind, make):
    _ok(cli("create", "v", "--size", "1M"))
    image = tmp_path / "disk.img"
    image.write_bytes(make())
    line = _one_line_error(cli("import", "v", image))
    assert f"a {kind} image" in line and "qemu-img convert" in line and "--raw" in line
    assert json.loads(_ok(cli("info", "v", "--json")).stdout)["segments"] == 0
    _ok(cli("import", "v", image, "--raw"))
    out = tmp_path / "out.img"
    _ok(cli("export", "v", out))
    assert out.read_bytes()[:len(make())] == make()


def test_a_real_qcow2_file_is_refused(cli, tmp_path):
    """qemu-img's own output, where it is installed (make test installs it)."""
    if shutil.which("qemu-img") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-img is missing")
        pytest.skip("qemu-img is missing")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    _ok(cli("create", "v", "--size", "1M"))
    line = _one_line_error(cli("import", "v", image))
    assert "qcow2" in line
