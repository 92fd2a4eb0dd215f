"""Uploads around a crash.  A power cut stops every thread of the writer at
once: what it had sent either lands before the machine is back, or not at
all (S3 never completes a PUT whose body it did not receive whole).  The
crash stop of the tests (Volume.abandon) must do no more: an upload thread
left running after it read its segment file from the cache dir the cut was
putting back, half written, and stored that under the segment's name (the
power-cut soak then failed once in three runs with "segment 9 ... too short
to be a sealed segment").  A complete upload that the store finishes late,
after the next open listed it, is a real case: the next writer finds its
own segment there."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from engine_helpers import BS, MiB, blocks, open_test_store

from lsbd import names
from lsbd.engine import opening, testing
from lsbd.engine.volume import Volume
from lsbd.errors import TransientStoreError
from lsbd.map.blockmap import STORED
from lsbd.meta.config import create_volume
from lsbd.segments import uploader as uploader_mod
from lsbd.store.faulty import FaultyStore

VOLUME_SIZE = 16 * MiB


def _volume(tmp_path, store_url):
    store = FaultyStore(open_test_store(store_url))
    create_volume(store, "vol", VOLUME_SIZE, seal_interval=3600.0)
    return store, str(tmp_path / "cache")


def test_a_crash_stop_returns_only_once_no_upload_runs(tmp_path, store_url):
    """abandon() waits for the upload under way (it is stored: its body was
    read before the stop), and nothing of the dead writer reads a segment
    file or puts an object once it has returned."""
    store, cache = _volume(tmp_path, store_url)
    reached, release = threading.Event(), threading.Event()
    events: list[str] = []
    real_put_file = store.put_file

    def held_put_file(key: str, path: str, **kw) -> None:
        if "/seg/" in key:
            events.append("upload starts")
            reached.set()
            release.wait(30)
            with open(path, "rb") as f:
                f.read()
            events.append("segment file read")
        real_put_file(key, path, **kw)

    store.put_file = held_put_file      # type: ignore[method-assign]
    try:
        vol = Volume.open(store, "vol", cache_root=cache)
        vol.write(0, blocks(1, 0, 8))
        seq = testing.seal_now(vol)
        assert reached.wait(30), "the segment's upload never started"
        stopper = threading.Thread(target=lambda: (vol.abandon(), events.append("stopped")),
                                   daemon=True)
        stopper.start()
        stopper.join(0.5)
        held_still = stopper.is_alive()
        release.set()
        stopper.join(30)
        assert not stopper.is_alive()
        assert held_still, "the crash stop returned while an upload was still running"
        assert events == ["upload starts", "segment file read", "stopped"], events
        time.sleep(0.3)
        assert events[-1] == "stopped", f"the dead writer went on uploading: {events}"
        store.put_file = real_put_file  # type: ignore[method-assign]
        vol = Volume.open(store, "vol", cache_root=cache)
        try:
            assert testing.wait_stored(vol, seq)
            assert vol.read(0, 8 * BS) == blocks(1, 0, 8)
        finally:
            vol.close()
    finally:
        release.set()
        store.close()


def test_a_crash_stop_ends_the_retries_of_failed_uploads(tmp_path, store_url, monkeypatch):
    """An upload waiting to retry a failed put makes no new attempt once
    the writer is stopped by a crash."""
    # The wait before a retry: 10 s, so that the stop comes inside it.
    monkeypatch.setattr(uploader_mod, "random", SimpleNamespace(random=lambda: 100.0))
    store, cache = _volume(tmp_path, store_url)
    store.fail(op="put", key_prefix="volumes/vol/seg/", times=None, error=TransientStoreError)
    try:
        vol = Volume.open(store, "vol", cache_root=cache)
        vol.write(0, blocks(1, 0, 8))
        testing.seal_now(vol)
        deadline = time.monotonic() + 30
        while testing.upload_error(vol) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert testing.upload_error(vol) is not None, "the put never failed"
        attempts = store.calls["put"]
        vol.abandon()
        time.sleep(0.3)
        assert store.calls["put"] == attempts, "a crashed writer tried its upload again"
    finally:
        store.heal()
        store.close()


def test_a_late_upload_of_the_dead_writer_lands_after_the_next_open_listed(
        tmp_path, store_url, monkeypatch):
    """The dead writer's put of a whole segment completes only after the
    next open has listed the store: that open uploads the same segment from
    its cache dir, finds it there and counts it as its own (not another
    writer's); nothing is lost and the volume opens again."""
    store, cache = _volume(tmp_path, store_url)
    store.fail(op="put", key_prefix="volumes/vol/seg/", times=None, error=TransientStoreError)
    data = blocks(2, 0, 8)
    try:
        vol = Volume.open(store, "vol", cache_root=cache)
        vol.write(0, data)
        seq = testing.seal_now(vol)
        vol.flush()
        with open(testing.local_path(vol, seq), "rb") as f:
            sent = f.read()
        vol.abandon()
        store.heal()
        key = names.segment_key("vol", seq)
        real_list = opening.store_segment_seqs

        def listed_then_late_put(st, name):
            stored = real_list(st, name)
            assert seq not in stored
            store.inner.put(key, sent)          # the late PUT lands
            return stored

        monkeypatch.setattr(opening, "store_segment_seqs", listed_then_late_put)
        vol = Volume.open(store, "vol", cache_root=cache)
        monkeypatch.setattr(opening, "store_segment_seqs", real_list)
        try:
            assert testing.wait_stored(vol, seq), testing.upload_error(vol)
            assert testing.segment(vol, seq).state == STORED
            assert testing.uploader(vol).fatal is None
            vol.write(8 * BS, blocks(3, 8, 8))
        finally:
            vol.close()
        vol = Volume.open(store, "vol", cache_root=cache)
        try:
            assert vol.read(0, 16 * BS) == data + blocks(3, 8, 8)
        finally:
            vol.close()
    finally:
        store.close()

