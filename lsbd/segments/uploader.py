"""Background upload of sealed segments, several in flight, tracking the
durable prefix: the highest seq such that it and every seq before it are in
the store.  A failed upload is retried with backoff until it succeeds (the
data is safe in the journal meanwhile); the last error is kept so that a
caller waiting on durability can report it."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Collection
from typing import Callable

from lsbd import names
from lsbd.format.segment import TRAILER
from lsbd.errors import LeaseLost, ObjectExists, StoreError
from lsbd.store import Store
from lsbd.store.settle import reads_back

log = logging.getLogger(__name__)


def _at_thread_shutdown(call: Callable[[], object]) -> None:
    """Run `call` when the interpreter shuts down, before it joins the
    threads left running (atexit handlers run only after that join).
    concurrent.futures uses the same hook to stop its workers."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:   # pragma: no cover - other Pythons: threads are joined as they are
        return
    try:
        register(call)
    except RuntimeError:   # already shutting down
        pass


def _give_up_if_alive(ref: weakref.ReferenceType[Uploader]) -> None:
    uploader = ref()
    if uploader is not None:
        uploader.give_up()


#: While a close waits, how often it asks the store a small question (a HEAD
#: of the volume's config) to learn whether the store answers at all.
PROBE_INTERVAL = 5.0


class ForeignWriter(StoreError):
    """The store already holds a different object at our seq: someone else wrote."""


class Uploader:
    def __init__(self, store: Store, volume: str, path_of: Callable[[int], str],
                 on_stored: Callable[[int], None], *, workers: int = 4, durable_seq: int = 0,
                 already_stored: Collection[int] = frozenset(),
                 fence: Callable[[], None] | None = None,
                 local_tail: Callable[[int, int], tuple[int, bytes]] | None = None,
                 segment_length: Callable[[int], int] | None = None):
        self.store = store
        # seq -> the segment's length in its local file, which is not the
        # file's size once a sealing by link has appended to it
        # (lsbd.crypto.linked): what the store is told to store.
        self.segment_length = segment_length
        # (seq, n) -> (the segment's size, its last n bytes), from its local
        # file (decrypted on an encrypted volume: lsbd.segments.copies).
        self.local_tail = local_tail
        # Called before every upload: raises LeaseLost once another writer
        # took the lease, so that a fenced writer never adds a segment to the
        # new writer's history (the conditional create guards the seqs the
        # new writer has already written).
        self.fence = fence
        # A store without conditional creates cannot refuse our put of a seq
        # another writer took: read the trailer back after each upload too.
        self._guarded = not store.conditional_writes
        self.volume = volume
        self.path_of = path_of
        self.on_stored = on_stored
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lsbd-upload")
        self._cond = threading.Condition()
        # Stored segments above the durable prefix (uploads finish out of order).
        self._done: set[int] = {s for s in already_stored if s > durable_seq}
        self._inflight: set[int] = set()
        # Uploads stored so far: a failed upload backing off retries at once
        # when this moves (the store is back; its own wait could be 45 s).
        self._stored_count = 0
        self.durable_seq = durable_seq
        self._advance()
        self.last_error: BaseException | None = None
        self._failing_since: float | None = None   # uploads failing since (none stored)
        # When the store last answered: an upload stored, or a close's probe.
        self._answered_at = time.monotonic()
        self._probing = False
        #: Set when a close stopped waiting because the store answered nothing.
        self.silent_for: float | None = None
        self.fatal: BaseException | None = None
        self._closing = False
        self._stop = threading.Event()
        # A volume never closed must not keep its process from exiting while
        # a failing store is retried: Python joins these threads at exit.
        # Just before that, stop retrying (the segments stay in the cache
        # dir, and the next open uploads them).
        me = weakref.ref(self)
        _at_thread_shutdown(lambda: _give_up_if_alive(me))

    def submit(self, seq: int) -> None:
        with self._cond:
            self._inflight.add(seq)
        self._pool.submit(self._upload, seq)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._inflight)

    def _upload(self, seq: int) -> None:
        key = names.segment_key(self.volume, seq)
        delay = 0.1
        while self.fatal is None:
            if self._closing:
                # Closed: no new attempt (a crash stop waits for the ones running).
                with self._cond:
                    self._inflight.discard(seq)
                    self._cond.notify_all()
                return
            stored_before = self._stored_count
            try:
                path = self.path_of(seq)
                if self.fence is not None:
                    self.fence()
                try:
                    if not os.path.exists(path) and self.store.exists(key):
                        # Stored and evicted, but a power cut undid the map's
                        # last commit (which said so): it is in the store.
                        pass
                    else:
                        length = (None if self.segment_length is None
                                  else self.segment_length(seq))
                        self.store.put_file(key, path, exclusive=True, length=length)
                        if self._guarded:
                            self._check_ours(key, seq, path)
                except ObjectExists:
                    # Ours from before a crash, or another writer's?
                    self._check_ours(key, seq, path)
                self.on_stored(seq)
                break
            except (ForeignWriter, LeaseLost) as e:
                self.stop_for(e)
                return
            except Exception as e:  # noqa: BLE001 - keep trying: the data is safe locally
                with self._cond:
                    self.last_error = e
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                    if self._closing:
                        self._inflight.discard(seq)
                        self._cond.notify_all()
                        return
                log.warning("upload of %s failed (%s); retrying in %.1fs", key, e, delay)
                if self._wait_for_retry(delay * (0.5 + random.random()), stored_before):
                    delay = 0.1      # another upload got through: so may this one
                else:
                    delay = min(delay * 2, 30.0)
        else:
            return
        with self._cond:
            self._inflight.discard(seq)
            self._done.add(seq)
            self._stored_count += 1
            self._advance()
            self.last_error = None
            self._failing_since = None
            self._answered_at = time.monotonic()
            self._cond.notify_all()

    def _wait_for_retry(self, pause: float, stored_before: int) -> bool:
        """Back off for `pause` seconds, or until another upload is stored
        (True) or the uploader stops."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (self._stored_count != stored_before or self._closing
                         or self.fatal is not None or self._stop.is_set()),
                pause) and self._stored_count != stored_before

    def _check_ours(self, key: str, seq: int, path: str) -> None:
        """The object at `key` ends with our segment's trailer (an explicit
        range: the object is ours only if its size is our file's)."""
        if self.local_tail is not None:
            size, ours = self.local_tail(seq, TRAILER.size)
        else:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                f.seek(size - TRAILER.size)
                ours = f.read()
        # A store may acknowledge a PUT before the object reads back whole:
        # only a trailer that stays foreign is another writer's.
        if reads_back(lambda: self.store.get(key, size - TRAILER.size, TRAILER.size), ours,
                      stop=self._stop, what=key):
            return
        raise ForeignWriter(f"{key} was written by another writer: this volume "
                            "is no longer ours (was its lease broken?)")

    def stop_for(self, error: BaseException) -> None:
        """Another writer owns the volume now: upload nothing more."""
        with self._cond:
            if self.fatal is None:
                log.error("%s", error)
                self.fatal = error
            self._cond.notify_all()
        self._stop.set()

    def give_up(self) -> None:
        """Stop retrying failed uploads (the ones running finish); a close
        waiting for them returns."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._stop.set()

    def _advance(self) -> None:
        while self.durable_seq + 1 in self._done:
            self.durable_seq += 1
            self._done.discard(self.durable_seq)

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until every seq <= `seq` is in the store.  False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.durable_seq < seq:
                if self.fatal is not None:
                    raise self.fatal
                if self._closing:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
        return True

    def failing_for(self) -> float:
        """Seconds since uploads started failing with none stored since (0: not failing)."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    def _probe(self) -> None:
        """Ask the store a small question in a thread of its own; an answer
        shows it is alive (a slow upload is then waited for)."""
        def ask() -> None:
            try:
                self.store.exists(names.config_key(self.volume))
            except Exception:  # noqa: BLE001 - no answer; the uploads report their errors
                answered = False
            else:
                answered = True
            with self._cond:
                self._probing = False
                if answered:
                    self._answered_at = time.monotonic()
                self._cond.notify_all()

        self._probing = True
        threading.Thread(target=ask, name="lsbd-upload-probe", daemon=True).start()

    def close(self, timeout: float | None, *, stall: float | None = None,
              silence: float | None = None, join: bool = False) -> None:
        """Stop: wait up to `timeout` for uploads in flight, then give up on them
        (they stay in the journal for the next open).  stall: give up sooner,
        once uploads have failed for this long with none getting through
        (the store is down: waiting longer only delays the stop).  silence:
        give up once the store has answered nothing for this long while
        uploads are under way (it takes requests and never answers: each
        attempt would fail only at the read timeout); a small request every
        PROBE_INTERVAL tells a slow but healthy store from a stalled one.
        join: also wait for the attempts running to end, so that nothing of
        this writer reads the cache dir or reaches the store once close
        returns (a crash stop: after a power cut the dead writer's requests
        are all settled)."""
        with self._cond:
            started = time.monotonic()
            deadline = None if timeout is None else started + timeout
            probed = 0.0
            while self._inflight and self.fatal is None and not self._closing:
                now = time.monotonic()
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    break
                if stall is not None and self.failing_for() >= stall:
                    break
                if silence is not None:
                    quiet = now - max(started, self._answered_at)
                    if quiet >= silence:
                        self.silent_for = quiet
                        log.warning("%s: the store has answered nothing for %.0fs; %d uploads "
                                    "under way are left to the next open", self.volume, quiet,
                                    len(self._inflight))
                        break
                    if not self._probing and now - probed >= PROBE_INTERVAL:
                        probed = now
                        self._probe()
                pause = min(1.0, PROBE_INTERVAL)
                self._cond.wait(min(remaining, pause) if remaining is not None else pause)
            self._closing = True
            self._cond.notify_all()  # waiters give up: nothing more will be stored
        self._stop.set()
        self._pool.shutdown(wait=join, cancel_futures=True)
