"""The cache dir and a local store are private whatever the umask: every
file lsbd makes there is 0600 (or read-only 0400), every directory 0700
(docs/security.md).  An encrypted volume's map says which blocks were
written and when; a plain volume's cache and store hold its data."""

from __future__ import annotations

import os
import stat

import pytest
from engine_helpers import MiB, run_cli

from lsbd import private


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _not_private(root) -> list[str]:
    loose = []
    for folder, _dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            mode = os.lstat(name).st_mode
            if stat.S_ISDIR(mode) and mode & 0o777 != 0o700 \
                    or stat.S_ISREG(mode) and mode & 0o077:
                loose.append(f"{oct(mode & 0o777)} {name}")
    return loose


def test_cache_dir_and_local_store_are_private(tmp_path, umask_022):
    store, cache = tmp_path / "store" / "a", tmp_path / "cache" / "b"
    url = "file://" + str(store)
    image = tmp_path / "data.raw"
    image.write_bytes(os.urandom(3 * MiB))
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    key = ["--passphrase-file", str(secret)]
    for args in (["create", "sec", "--size", "64M", "--encrypt", *key], ["import", "sec", image, *key],
                 ["snapshot", "create", "sec", "s1", *key], ["checkpoint", "sec", *key],
                 ["create", "plain", "--size", "64M"], ["import", "plain", image],
                 ["compact", "plain"], ["export", "plain", tmp_path / "out.raw", "--seq", "1"]):
        run_cli(*args, store=url, cache=cache, check=True)
    assert any(cache.rglob("data.mdb"))
    assert _not_private(tmp_path / "cache") == []
    assert _not_private(tmp_path / "store") == []


def test_an_existing_folder_is_made_private_its_parents_are_left(tmp_path, umask_022):
    mine = tmp_path / "shared" / "mine"
    mine.mkdir(parents=True, mode=0o755)
    private.make_dirs(str(mine))
    assert mine.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    private.make_dirs(str(root), fix_existing=False)     # the user's: left as it is
    assert root.stat().st_mode & 0o777 == 0o755
    private.make_dirs(str(root / "x" / "y"), fix_existing=False)
    assert (root / "x").stat().st_mode & 0o777 == 0o700
    assert (root / "x" / "y").stat().st_mode & 0o777 == 0o700
    with pytest.raises(NotADirectoryError):
        (tmp_path / "file").write_text("")
        private.make_dirs(str(tmp_path / "file"))
