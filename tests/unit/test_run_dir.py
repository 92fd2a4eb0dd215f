"""The runtime directory of mounts' pid records and logs (/tmp/lsbd-UID for
a user without XDG_RUNTIME_DIR) must be this user's and writable by no one
else: another account that made it first could plant a pid record that
`lsbd umount` signals, or a symlink named like a mount's log."""

from __future__ import annotations

import os

import pytest

from lsbd_fuse import mounts


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    path = tmp_path / "run"
    monkeypatch.setenv("LSBD_RUN_DIR", str(path))
    return path


def test_made_private_when_missing(run_dir):
    assert mounts.make_run_dir() == str(run_dir)
    assert run_dir.stat().st_mode & 0o777 == 0o700
    mounts.write_pid_file("/nowhere/mnt", name="vol")
    assert os.path.exists(mounts.pid_path("/nowhere/mnt"))


def test_ours_and_closed_to_writers_is_taken(run_dir):
    run_dir.mkdir(mode=0o755)
    run_dir.chmod(0o755)
    assert mounts.run_dir() == str(run_dir)


@pytest.mark.parametrize("spoil", ["world-writable", "group-writable", "symlink", "foreign"])
def test_one_others_could_write_is_refused(run_dir, tmp_path, spoil):
    if spoil == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        run_dir.symlink_to(tmp_path / "elsewhere")
    else:
        run_dir.mkdir(mode=0o700)
        run_dir.chmod({"world-writable": 0o1777, "group-writable": 0o770}.get(spoil, 0o700))
        if spoil == "foreign":
            if os.geteuid() != 0:
                pytest.skip("giving a directory to another account needs root")
            os.chown(run_dir, 65534, 65534)
    with pytest.raises(mounts.MountError, match="LSBD_RUN_DIR"):
        mounts.pid_path("/nowhere/mnt")
    with pytest.raises(mounts.MountError):
        mounts.write_pid_file("/nowhere/mnt", name="vol")
