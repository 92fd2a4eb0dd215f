"""The write path under faults of the cache dir's disk: a flush or a seal
that fails must never leave a later one reporting durability it does not
have, nor a journal written twice at one offset under one key."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from engine_helpers import BS, block

from lsbd import fileio
from lsbd.crypto.localfile import HEADER, LocalKeys
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.errors import StoreError
from lsbd.format.segment import DATA, block_crcs
from lsbd.segments.journal import OpenSegment

VOLID = bytes(range(16))


def _fail_first_sync(monkeypatch) -> list[int]:
    """fileio.fdatasync fails (EIO) at its first call, as a writeback error
    reports itself, and works after; returns the list of its calls."""
    calls: list[int] = []
    real = fileio.fdatasync

    def failing_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected: writeback failed")
        real(fd)

    monkeypatch.setattr(fileio, "fdatasync", failing_once)
    return calls


def test_a_journal_whose_sync_failed_never_reports_itself_synced(tmp_path, monkeypatch):
    a = block(1, 0)
    seg = OpenSegment(str(tmp_path / "j"), volume_id=VOLID, seq=3, block_size=BS)
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=True)
    calls = _fail_first_sync(monkeypatch)
    with pytest.raises(OSError):
        seg.sync()
    with pytest.raises(OSError, match="a sync of it failed"):
        seg.sync()
    seg.seal(64 * BS, 0)
    with pytest.raises(OSError, match="a sync of it failed"):
        seg.finish()        # the sealer: never into the map as synced
    assert len(calls) == 1
    seg.close_fd()


def test_a_flush_after_a_failed_sync_never_reports_success(make_volume, monkeypatch):
    """Linux marks the pages of a failed writeback clean: an fdatasync after
    a failed one succeeds though the data it held never reached the disk.
    So once a journal's sync failed, no later flush may succeed for it (and
    the volume stops taking writes, as when the sealer's sync fails)."""
    vol = make_volume()
    vol.write(0, block(1, 0))
    _fail_first_sync(monkeypatch)
    with pytest.raises(OSError):
        vol.flush()
    with pytest.raises((OSError, StoreError)):
        vol.flush()
    with pytest.raises((OSError, StoreError)):
        vol.write(BS, block(2, 1), fua=True)
    with pytest.raises(StoreError, match="stopped taking writes"):
        vol.write(2 * BS, block(3, 2))
    # Nothing acknowledged is lost: the journal stays for the next open.
    vol.close()
    monkeypatch.undo()
    again = Volume.open(vol.store, "vol", cache_root=vol.cache_root)
    try:
        assert again.read(0, BS) == block(1, 0)
    finally:
        again.close()


def test_a_seal_cut_short_on_an_encrypted_journal_writes_no_offset_twice(tmp_path,
                                                                          monkeypatch):
    """A counter mode must never encrypt two plaintexts at one offset under
    one key (lsbd.crypto.localfile).  A seal whose write of the index
    reaches the disk only in part (a full disk) leaves those bytes past the
    journal's end: the next append, at that end, goes into a new file under
    a new key, as after a failed append."""
    key = bytes(range(32))
    keys = LocalKeys(VOLID, lambda _id: key, lambda: (1, key))
    path = str(tmp_path / "j")
    seg = OpenSegment(path, volume_id=VOLID, seq=3, block_size=BS, keys=keys)
    a, b = block(1, 0), block(2, 1)
    seg.append(DATA, 0, 1, data=a, crcs=block_crcs(a, BS), commit=True)
    end = seg.base + seg.end
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, buf, at: real(fd, buf[:len(buf) // 2], at))
    with pytest.raises(OSError, match="short write"):
        seg.seal(64 * BS, 0)
    monkeypatch.undo()

    def on_disk() -> tuple[bytes, bytes]:
        with open(path, "rb") as f:
            raw = f.read()
        return HEADER.unpack_from(raw)[2], raw[end:end + 32]

    file_id, first = on_disk()
    assert len(first) == 32     # half of the index did land past the end
    seg.append(DATA, 1, 1, data=b, crcs=block_crcs(b, BS), commit=True)
    new_id, second = on_disk()
    assert second != first
    assert new_id != file_id, "an offset written twice under one file key"
    seg.seal(64 * BS, 0)
    seg.finish()


def test_a_close_never_takes_the_descriptor_of_a_write_under_way(make_volume, tmp_path,
                                                                   monkeypatch):
    """A write that passed its checks before the close marked the volume
    closed may still be appending when the close shuts the journal's
    descriptor.  That number is then free for the next file any thread
    opens, and the write's bytes would land in that file.  The close waits
    for the write instead (the sealer's stop takes the volume's lock; without
    that lock the write went into another file): its bytes go into the
    journal, and read back after the next open."""
    vol = make_volume()
    vol.write(0, block(1, 0))
    cleaned, go_close = threading.Event(), threading.Event()
    inside, go_write = threading.Event(), threading.Event()
    held: list[int] = []
    real_pwritev = os.pwritev

    def pause_after_clean_close() -> None:
        cleaned.set()
        go_close.wait(10)

    def held_pwritev(fd, buffers, at):
        if threading.current_thread().name == "late-writer":
            held.append(fd)
            inside.set()
            go_write.wait(10)
        return real_pwritev(fd, buffers, at)

    testing.after_clean_close(vol, pause_after_clean_close)
    monkeypatch.setattr(os, "pwritev", held_pwritev)
    closer = threading.Thread(target=vol.close, name="closer")
    closer.start()
    assert cleaned.wait(10)
    errors: list[BaseException] = []

    def late_write() -> None:
        try:
            vol.write(BS, block(2, 1))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    writer = threading.Thread(target=late_write, name="late-writer")
    writer.start()
    assert inside.wait(10)
    go_close.set()
    closer.join(2)      # closed under the write (before the fix), or waiting for it
    others = []
    try:
        # Take every descriptor number up to the one the write holds.
        for i in range(256):
            f = open(tmp_path / f"other-{i}", "wb+")
            others.append(f)
            if f.fileno() >= held[0]:
                break
        go_write.set()
        writer.join(10)
        closer.join(10)
        assert not closer.is_alive() and not writer.is_alive()
        assert [f.name for f in others if os.fstat(f.fileno()).st_size] == []
    finally:
        go_write.set()
        for f in others:
            f.close()
    assert errors == []
    monkeypatch.undo()
    again = Volume.open(vol.store, "vol", cache_root=vol.cache_root)
    try:
        assert again.read(0, 2 * BS) == block(1, 0) + block(2, 1)
    finally:
        again.close()
