"""lsbd.linux: each call works here, and each falls back where it is missing."""

import os

import pytest

from lsbd import linux


def test_preallocate_reserves_blocks_without_growing_the_file(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        linux.preallocate(fd, 1 << 20)
        linux.start_writeback(fd, 0, 1 << 20)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)


def test_unfilled_bytearrays_are_whole_writable_bytearrays():
    for n in (0, 4096, 1 << 20):
        buf = linux.unfilled_bytearray(n)
        assert type(buf) is bytearray and len(buf) == n
        if n:
            buf[-1] = 7


@pytest.mark.parametrize("name", ["_fallocate", "_sync_file_range", "_mallopt"])
def test_each_call_falls_back_where_the_c_library_lacks_it(tmp_path, monkeypatch, name):
    monkeypatch.setattr(linux, name, None)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        linux.preallocate(fd, 1 << 20)
        linux.start_writeback(fd, 0, 4096)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    if name == "_mallopt":
        assert linux.mallopt(linux.M_TRIM_THRESHOLD, 1 << 20) is False
    else:
        assert linux.mallopt(linux.M_TRIM_THRESHOLD, 128 << 10) is True


def test_a_missing_function_is_none():
    assert linux._function("no_such_libc_function_lsbd", []) is None


def test_will_need_advises_a_long_range_a_piece_at_a_time(tmp_path, monkeypatch):
    """The kernel reads at most its read-ahead window of one WILLNEED,
    whatever its length: a long range goes to it in pieces that cover it
    exactly, each at most WILL_NEED_PIECE."""
    asked: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda _fd, off, n, advice: asked.append(
        (off, n, advice)))
    piece = linux.WILL_NEED_PIECE
    linux.will_need(3, 1000, 5 * piece + 17)
    assert [a for _o, _n, a in asked] == [os.POSIX_FADV_WILLNEED] * 6
    assert all(0 < n <= piece for _o, n, _a in asked)
    pos = 1000
    for off, n, _a in asked:
        assert off == pos
        pos += n
    assert pos == 1000 + 5 * piece + 17
    asked.clear()
    linux.will_need(3, 0, 0)
    assert asked == []

