"""lsbd.startahead: a start's files listed, then read ahead at the next start."""

import os
import sys
import threading
import time

import pytest

from lsbd import startahead


def test_a_recorded_start_is_read_ahead_at_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    startahead.record()
    listed = open(startahead.list_path()).read().split()
    mine = sys.modules["lsbd.startahead"].__spec__
    assert mine.cached in listed

    asked = []
    real = os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        asked.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    for t in startahead.read_ahead():
        t.join()
    # The libraries this process maps already (libc, libpython) are read:
    # not again.
    mapped = startahead.mapped_libraries()
    assert any(n in mapped for n in listed)
    here = [os.path.realpath(n) for n in listed if os.path.exists(n) and n not in mapped]
    assert sorted(name for name, _ in asked) == sorted(here)
    assert {advice for _, advice in asked} == {os.POSIX_FADV_WILLNEED}


def test_no_list_or_a_file_gone_is_no_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for t in startahead.read_ahead():       # no list yet
        t.join()
    os.makedirs(os.path.dirname(startahead.list_path()))
    with open(startahead.list_path(), "w") as f:
        f.write(str(tmp_path / "gone.pyc") + "\n")
    for t in startahead.read_ahead():
        t.join()


def test_the_list_grows_with_each_start(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    os.makedirs(os.path.dirname(startahead.list_path()))
    with open(startahead.list_path(), "w") as f:
        f.write("/nowhere.pyc\n")
    startahead.record()
    listed = open(startahead.list_path()).read().split()
    assert "/nowhere.pyc" in listed and sys.modules["lsbd.startahead"].__spec__.cached in listed
    before = os.stat(startahead.list_path()).st_mtime_ns
    os.utime(startahead.list_path(), ns=(0, 0))
    startahead.record()         # nothing new: not rewritten
    assert os.stat(startahead.list_path()).st_mtime_ns == 0 != before


def _slow_reads_ahead(tmp_path, monkeypatch, files=400):
    """A list of `files` files whose read-ahead takes 5 ms each; the
    names of the files asked for so far."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    names = []
    for k in range(files):
        name = tmp_path / f"f{k}"
        name.write_bytes(b"x")
        names.append(str(name))
    os.makedirs(os.path.dirname(startahead.list_path()))
    with open(startahead.list_path(), "w") as f:
        f.write("\n".join(names) + "\n")
    asked = []

    def fadvise(fd, offset, length, advice):
        time.sleep(0.005)
        asked.append(fd)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    startahead.read_ahead()
    return asked


def _ours():
    return [t for t in threading.enumerate() if t.name == "lsbd-startahead" and t.is_alive()]


def test_finish_stops_the_reads_ahead_and_waits_for_the_threads(tmp_path, monkeypatch):
    asked = _slow_reads_ahead(tmp_path, monkeypatch)
    assert _ours()
    startahead.finish()
    assert not _ours()
    assert len(asked) < 400     # stopped, not run to the end


def test_a_mount_forks_with_no_read_ahead_thread_left(tmp_path, monkeypatch):
    from lsbd_fuse import daemon

    _slow_reads_ahead(tmp_path, monkeypatch)
    at_fork = []

    class Forked(Exception):
        pass

    def fork():
        at_fork.append(len(_ours()))
        raise Forked

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(daemon, "make_run_dir", lambda: None)
    monkeypatch.setattr(daemon, "log_path", lambda mnt: str(tmp_path / "mount.log"))
    with pytest.raises(Forked):
        daemon._start_background(lambda: {}, str(tmp_path), name="v", read_only=False,
                                 direct_io=False, finalizer=None, debug=False, readahead=0)
    assert at_fork == [0]


def test_the_list_holds_the_shared_libraries_and_the_data_files_of_a_start(tmp_path,
                                                                           monkeypatch):
    """A start also reads the shared libraries it maps (libc, libpython,
    libssl, ...) and data files of its packages (botocore's JSON): both
    are listed.  Files it opens elsewhere (a file:// store's objects, the
    cache dir) are not: they are no start's, and may be large."""
    import json
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    startahead.watch_opens()
    data = os.path.join(os.path.dirname(json.__file__), "decoder.py")
    assert data.startswith(startahead.install_dirs())
    with open(data, "rb"):
        pass
    elsewhere = tmp_path / "segment"
    elsewhere.write_bytes(b"x")
    with open(elsewhere, "rb"):
        pass
    startahead.record()
    listed = open(startahead.list_path()).read().split()
    assert data in listed
    assert str(elsewhere) not in listed
    assert any(os.path.basename(n).startswith("libc.so") for n in listed), \
        "the C library this process maps is not listed"
