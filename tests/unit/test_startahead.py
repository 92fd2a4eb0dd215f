"""lsbd.startahead: a start's files listed, then read ahead at the next start."""

import os
import sys

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
    here = [os.path.realpath(n) for n in listed if os.path.exists(n)]
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
