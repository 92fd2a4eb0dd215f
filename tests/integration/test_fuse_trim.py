"""What the kernel protocol brought the FUSE mount, tested through real mounts:
TRIM and WRITE_ZEROES from a loop device and from fallocate reach the
engine, a resize through the running writer reaches the kernel, several
queues serve correctly.  Needs root and /dev/fuse (fails in CI without).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from fuse_helpers import FuseEnv, fuse_env, require_fuse, run, zeroed

MiB = 1 << 20


@pytest.fixture
def fenv(tmp_path, monkeypatch):
    with fuse_env(tmp_path, monkeypatch, "fstrim", "fallocate", "dmesg") as env:
        yield env


def _stats(env: FuseEnv) -> dict:
    return json.loads(env.lsbd("stats", "vol", "--json").stdout)


def _write_zeroes_errors() -> int:
    r = run("dmesg", check=False)
    return sum("WRITE_ZEROES" in line and "error" in line for line in r.stdout.splitlines())


def _stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.fuse
def test_discard_fstrim_and_compact_give_the_space_back(fenv):
    mnt, ext = fenv.tmp / "mnt", fenv.tmp / "ext"
    image = fenv.mounted_volume("1G", mnt, "--retain", "0")
    loop = run("losetup", "-f", "--show", "--direct-io=on", image).stdout.strip()
    fenv.loops.append(loop)
    errors = _write_zeroes_errors()
    run("mkfs.ext4", "-q", "-F", loop, timeout=300)     # discards, then zeroes (WRITE_ZEROES)
    assert _write_zeroes_errors() == errors, "the loop device's WRITE_ZEROES failed"
    ext.mkdir()
    run("mount", "-o", "discard", loop, ext)
    fenv.ext_mounts.append(ext)

    with open(ext / "big", "wb") as f:
        for _ in range(300):
            f.write(os.urandom(MiB))
    run("sync")
    full = _stats(fenv)["live_bytes"]                  # (sealed segments only)
    assert full >= 250 * MiB
    (ext / "big").unlink()
    run("sync")                                         # ext4 discards at its journal commit
    deadline = time.monotonic() + 20
    while _stats(fenv)["live_bytes"] > full - 250 * MiB:
        assert time.monotonic() < deadline, f"live data stays at {_stats(fenv)['live_bytes']}"
        time.sleep(0.2)

    r = run("fstrim", "-v", ext)                        # says how much it trimmed
    trimmed = int(r.stdout.split("(")[1].split()[0])
    assert trimmed > 500 * MiB, r.stdout
    run("umount", ext)

    store = fenv.tmp / "store"
    before = _stored_bytes(store)
    report = json.loads(fenv.lsbd("compact", "vol", "--json").stdout)
    assert report["bytes_reclaimed"] >= 250 * MiB, report
    assert _stored_bytes(store) < before - 250 * MiB
    run("losetup", "-d", loop)
    fenv.umount(mnt)


@pytest.mark.fuse
def test_punch_hole_and_zero_range_read_back_as_zeros(fenv):
    mnt = fenv.tmp / "mnt"
    image = fenv.mounted_volume("64M", mnt)
    data = os.urandom(8 * MiB)
    with open(image, "r+b") as f:
        f.write(data)
    run("fallocate", "--punch-hole", "--offset", "4096", "--length", str(MiB), image)
    run("fallocate", "--zero-range", "--offset", str(3 * MiB + 100), "--length", "5000", image)
    with open(image, "rb") as f:
        got = f.read(8 * MiB)
    want = zeroed(data, (4096, MiB), (3 * MiB + 100, 5000))
    assert got == want
    assert image.stat().st_size == 64 * MiB              # KEEP_SIZE or not, the size stays
    fenv.remount(mnt, "--read-only")                     # and so it stays
    with open(image, "rb") as f:
        assert f.read(8 * MiB) == want
    r = run("fallocate", "--punch-hole", "--offset", "0", "--length", "4096", image, check=False)
    assert r.returncode != 0                             # a read-only image
    fenv.umount(mnt)


@pytest.mark.fuse
def test_resize_of_a_mounted_volume_reaches_the_kernel(fenv):
    require_fuse("resize2fs")
    mnt, ext = fenv.tmp / "mnt", fenv.tmp / "ext"
    image = fenv.mounted_volume("256M", mnt)

    def grow_to(size: int) -> None:
        assert image.stat().st_size < size                 # the kernel caches the size
        fenv.lsbd("resize", "vol", str(size))              # through the running writer
        start = time.monotonic()
        while image.stat().st_size != size:
            assert time.monotonic() - start < 1.0, "the image still shows the old size"
            time.sleep(0.02)

    grow_to(384 * MiB)                                     # nothing else touches the image
    fenv.mkfs(image)
    loop = fenv.loop_mount(image, ext)
    before = os.statvfs(ext).f_blocks
    grow_to(768 * MiB)                                     # under a mounted ext4
    run("losetup", "-c", loop)                           # the loop device learns the new size
    if _has_cap_sys_resource():
        run("resize2fs", loop, timeout=300)              # online
    else:
        # ext4's online resize needs CAP_SYS_RESOURCE, which some containers
        # drop even for root: grow it offline, still on the live mount.
        fenv.loop_umount(ext)
        run("e2fsck", "-fp", image, timeout=300)
        run("resize2fs", image, timeout=300)
        fenv.loop_mount(image, ext)
    assert os.statvfs(ext).f_blocks > 1.8 * before
    payload = os.urandom(MiB) * 300                      # more than the old size held
    (ext / "after").write_bytes(payload)
    fenv.loop_umount(ext)
    run("e2fsck", "-fn", image, timeout=300)
    fenv.umount(mnt)


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    return False


@pytest.mark.fuse
@pytest.mark.parametrize("queues", [1, 3])
def test_fio_verify_with_one_and_several_queues(fenv, monkeypatch, queues):
    require_fuse("fio")
    monkeypatch.setenv("LSBD_FUSE_QUEUES", str(queues))
    mnt = fenv.tmp / "mnt"
    image = fenv.mounted_volume("256M", mnt)
    log = Path(fenv.tmp / "run").glob("*.log")
    assert any(f"({queues} queue" in p.read_text() for p in log)
    job = ["fio", "--name=verify", f"--filename={image}", "--direct=1",
           "--ioengine=libaio", "--iodepth=16", "--rw=randwrite", "--bsrange=4k-1M",
           "--size=96M", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=1",
           "--verify_state_save=0", "--output-format=terse"]
    run(*job, timeout=300)                              # fio exits non-zero on a mismatch
    r = subprocess.run(["fio", *job[1:], "--rw=randread", "--verify_only"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fenv.umount(mnt)


@pytest.mark.fuse
def test_losetup_right_after_lsbd_resize_finds_the_new_size(fenv):
    """`lsbd resize` then `losetup -c` at once, as docs/fuse.md shows: the
    mount tells the kernel the new size before the writer answers (it used
    to within SIZE_POLL, after `lsbd resize` had returned)."""
    mnt = fenv.tmp / "mnt"
    image = fenv.mounted_volume("256M", mnt)
    loop = run("losetup", "-f", "--show", str(image)).stdout.strip()
    try:
        for size in (384 * MiB, 512 * MiB, 640 * MiB):
            fenv.lsbd("resize", "vol", str(size))
            run("losetup", "-c", loop)
            assert int(run("blockdev", "--getsize64", loop).stdout) == size
    finally:
        run("losetup", "-d", loop, check=False)
    fenv.umount(mnt)


@pytest.mark.fuse
def test_a_mount_on_a_directory_that_is_not_empty_says_what_it_hides(fenv):
    mnt = fenv.tmp / "mnt"
    mnt.mkdir()
    (mnt / "notes.txt").write_text("hidden while mounted")
    fenv.lsbd("create", "vol", "--size", "16M")
    r = fenv.mount("vol", mnt)
    assert "is not empty: its 1 entry stays hidden while the volume is mounted" in r.stderr
    assert [p.name for p in mnt.iterdir()] == ["vol.img"]
    fenv.umount(mnt)
    assert (mnt / "notes.txt").read_text() == "hidden while mounted"
    assert "not empty" not in fenv.mount("vol", fenv.tmp / "empty").stderr
    fenv.umount(fenv.tmp / "empty")


def test_an_export_onto_a_mounted_volumes_image_or_a_loop_device_writes_in_place(fenv):
    """A FUSE image cannot be replaced (its folder takes no new file): the
    export writes it in place, says so, overwrites its old bytes (holes as
    zeros) and grows it to the volume's size; one that fails says the image
    holds only part.  A loop device is written in place as ever."""
    data = os.urandom(3 * MiB)
    (fenv.tmp / "in.raw").write_bytes(data)
    fenv.lsbd("create", "src", "--size", "8M")
    fenv.lsbd("import", "src", fenv.tmp / "in.raw")
    fenv.lsbd("create", "vol", "--size", "4M")
    mnt = fenv.tmp / "mnt"
    fenv.mount("vol", mnt)
    image = mnt / "vol.img"
    with open(image, "r+b") as f:
        f.write(os.urandom(4 * MiB))
    r = fenv.lsbd("export", "src", image)
    assert "cannot be replaced" in r.stderr and "written in place" in r.stderr
    assert image.read_bytes() == data + bytes(5 * MiB)
    assert [p.name for p in mnt.iterdir()] == ["vol.img"]

    segment = next((Path(fenv.store[len("file://"):]) / "volumes" / "src" / "seg").iterdir())
    good = segment.read_bytes()
    body = bytearray(good)
    body[len(body) // 2] ^= 0xFF
    segment.chmod(0o600)
    segment.write_bytes(bytes(body))
    bad = fenv.lsbd("--cache-dir", fenv.tmp / "cache2", "export", "src", image, check=False)
    assert bad.returncode == 1
    assert "checksum" in bad.stderr and f"{image} was written in place and now holds only " \
        "part of the volume: export again" in bad.stderr
    segment.write_bytes(good)

    (fenv.tmp / "disk.raw").write_bytes(os.urandom(9 * MiB))
    dev = run("losetup", "-f", "--show", fenv.tmp / "disk.raw").stdout.strip()
    fenv.loops.append(dev)
    fenv.lsbd("export", "src", dev)
    assert (fenv.tmp / "disk.raw").read_bytes()[:8 * MiB] == data + bytes(5 * MiB)


def test_an_export_of_a_volume_onto_its_own_mounted_image_is_refused(fenv):
    """Reading a volume and writing it at once: by its image's path, through
    a symlink, as now or as a past state, whole or --from, it is refused in
    one line that names the volume and the mount, with nothing written.  The
    image of a volume of the same name in another store is written as
    before (it is not the same volume)."""
    data = os.urandom(2 * MiB)
    (fenv.tmp / "in.raw").write_bytes(data)
    fenv.lsbd("create", "vol", "--size", "4M")
    fenv.lsbd("import", "vol", fenv.tmp / "in.raw")
    fenv.lsbd("snapshot", "create", "vol", "s1")
    mnt = fenv.tmp / "mnt"
    fenv.mount("vol", mnt)
    image = mnt / "vol.img"
    (fenv.tmp / "link.img").symlink_to(image)
    stats = json.loads(fenv.lsbd("stats", "vol", "--json").stdout)
    for argv in [(image,), (fenv.tmp / "link.img",), (image, "--snapshot", "s1"),
                 (image, "--from", "s1")]:
        r = fenv.lsbd("export", "vol", *argv, check=False)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "is the image of vol itself" in lines[0], r.stderr
        assert str(mnt) in lines[0] and "lsbd restore vol" in lines[0], r.stderr
    assert json.loads(fenv.lsbd("stats", "vol", "--json").stdout)["segments"] == \
        stats["segments"], "a refused export wrote the volume"
    assert image.read_bytes() == data + bytes(2 * MiB)

    other = "file://" + str(fenv.tmp / "other-store")
    fenv.lsbd("--store", other, "create", "vol", "--size", "4M")
    r = fenv.lsbd("--store", other, "export", "vol", image)
    assert "written in place" in r.stderr
    assert image.read_bytes() == bytes(4 * MiB)
