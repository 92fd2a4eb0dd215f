"""The uploader's retries after a store outage."""

from __future__ import annotations

import threading
import time

from lsbd.errors import TransientStoreError
from lsbd.segments import uploader as uploader_mod
from lsbd.segments.uploader import Uploader


class FlakyStore:
    """Refuses every put while `down`; counts the refusals per key."""
    conditional_writes = True

    def __init__(self):
        self.down = True
        self.refused: dict[str, int] = {}
        self.stored: set[str] = set()
        self.lock = threading.Lock()

    def put_file(self, key, path, *, exclusive=False, length=None):
        with self.lock:
            if self.down:
                self.refused[key] = self.refused.get(key, 0) + 1
                raise TransientStoreError(f"put {key}: the store is down")
            self.stored.add(key)

    def exists(self, key):
        return key in self.stored


def test_an_upload_backing_off_retries_once_another_gets_through(tmp_path, monkeypatch):
    """After an outage, the first upload that succeeds wakes the ones waiting
    out a long backoff: the durable prefix must not lag the store's return
    by the backoff (up to 45 s), since a flush waits for it."""
    monkeypatch.setattr(uploader_mod.random, "random", lambda: 1.0)   # waits 0.15, 0.3, ... 4.8 s
    (tmp_path / "seg").write_bytes(b"segment")
    store = FlakyStore()
    up = Uploader(store, "vol", lambda seq: str(tmp_path / "seg"), lambda seq: None, workers=2)
    try:
        up.submit(1)
        first = "volumes/vol/seg/0000000000000001"
        deadline = time.monotonic() + 30
        while store.refused.get(first, 0) < 6:          # now backing off for 4.8 s
            assert time.monotonic() < deadline, store.refused
            time.sleep(0.01)
        store.down = False
        up.submit(2)                                    # stored at once
        assert up.wait_durable(2, timeout=2.0), "seq 1 waited out its backoff"
        assert store.refused[first] == 6
    finally:
        up.close(timeout=5)


class HangingStore:
    """Every put hangs until `release` is set; exists() answers at once
    while `answers`, else hangs too (a store that takes requests and never
    answers them)."""
    conditional_writes = True

    def __init__(self, *, answers: bool):
        self.answers = answers
        self.release = threading.Event()
        self.stored: set[str] = set()

    def put_file(self, key, path, *, exclusive=False, length=None):
        self.release.wait(60)
        self.stored.add(key)

    def exists(self, key):
        if not self.answers:
            self.release.wait(60)
        return key in self.stored


def _closing(tmp_path, monkeypatch, store) -> tuple[Uploader, float]:
    monkeypatch.setattr(uploader_mod, "PROBE_INTERVAL", 0.2)
    (tmp_path / "seg").write_bytes(b"segment")
    up = Uploader(store, "vol", lambda seq: str(tmp_path / "seg"), lambda seq: None, workers=2)
    up.submit(1)
    time.sleep(0.2)                         # the attempt is under way, and hangs
    started = time.monotonic()
    return up, started


def test_a_close_stops_waiting_once_the_store_answers_nothing(tmp_path, monkeypatch):
    """An attempt that hangs has not failed, so the rule "failed for 10 s in a
    row" never starts: silence (no answer, probes included) ends the wait."""
    store = HangingStore(answers=False)
    up, started = _closing(tmp_path, monkeypatch, store)
    try:
        up.close(timeout=30, stall=10, silence=1.0)
        assert time.monotonic() - started < 3
        assert up.silent_for is not None and up.silent_for >= 1.0
        assert up.durable_seq == 0
    finally:
        store.release.set()


def test_a_close_waits_for_a_slow_upload_while_the_store_answers(tmp_path, monkeypatch):
    """A slow but healthy store (a long upload, small requests answered) is
    waited for: the upload gets in and nothing is left over."""
    store = HangingStore(answers=True)
    up, started = _closing(tmp_path, monkeypatch, store)
    threading.Timer(3.0, store.release.set).start()
    try:
        up.close(timeout=30, stall=10, silence=1.0)
        assert time.monotonic() - started >= 2.5
        assert up.silent_for is None and up.durable_seq == 1
    finally:
        store.release.set()
