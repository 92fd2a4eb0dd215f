"""RetryingStore: retry TransientStoreError with exponential backoff and jitter.

Only TransientStoreError is retried; every other error (ObjectNotFound,
ObjectExists, permission, missing bucket, ...) goes straight to the caller.
When the attempts run out, the last TransientStoreError is raised with
"(gave up after N attempts)" added to its message.  `retry_within` bounds
the time as well: no new attempt starts once a request has been failing
for that long (a command someone waits for gives up on a store that takes
requests and never answers after two attempts, not five).

Exclusive puts need care.  A transient failure (a timeout, a dropped
connection) leaves the outcome unknown: the object may have been stored even
though no reply came back.  If a later attempt then gets ObjectExists, that
may be our own earlier attempt.  So after an unknown outcome we read the
object back, and identical content counts as success; anything else is a
genuine ObjectExists.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, Iterator, Sequence, TypeVar

from lsbd.errors import ObjectExists, ObjectNotFound, TransientStoreError
from lsbd.store.base import ObjectInfo, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A failed attempt that took this long is a stall the user has been
#: watching (a store that accepts connections and never answers: 5 s per
#: attempt of a small request, 60 s of a segment's transfer, at S3's read
#: timeouts): its retry is said at WARNING, not INFO.
SLOW_ATTEMPT = 5.0


class RetryingStore(Store):
    def __init__(self, inner: Store, attempts: int = 5, base_delay: float = 0.05,
                 max_delay: float = 2.0, *, retry_within: float | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if retry_within is not None and retry_within <= 0:
            raise ValueError("retry_within must be positive")
        self.inner = inner
        # Declared on Store, so __getattr__ would not pass them on.
        self.lists_etags = inner.lists_etags
        self.seals_objects = inner.seals_objects
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.retry_within = retry_within
        self._sleep = sleep
        self._clock = clock

    @property
    def url(self) -> str:  # type: ignore[override]
        return self.inner.url

    def __getattr__(self, name: str):
        # Anything else (bucket, root, counters of a test wrapper...) is the inner store's.
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def delay(self, retry: int) -> float:
        """The pause before retry number `retry` (1-based): exponential, capped,
        with jitter in [half, full] so that many clients do not retry in step."""
        full = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        return random.uniform(full / 2, full)

    def _out_of_time(self, first_began: float) -> bool:
        return self.retry_within is not None and self._clock() - first_began >= self.retry_within

    def _call(self, what: str, fn: Callable[[], T], on_transient: Callable[[], None] | None = None) -> T:
        first_began = self._clock()
        for attempt in range(1, self.attempts + 1):
            began = self._clock()
            try:
                return fn()
            except TransientStoreError as e:
                took = self._clock() - began
                if on_transient is not None:
                    on_transient()
                if attempt >= self.attempts or self._out_of_time(first_began):
                    if self.attempts > 1:
                        tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
                        e.strerror = f"{e.strerror} (gave up after {tries})"
                    raise
                pause = self.delay(attempt)
                # INFO: a quick retry that then succeeds is not the user's business,
                # and one that fails ends in the error itself (shown with -v); a
                # slow one is: without a word the command just seems to hang.
                level = logging.WARNING if took >= SLOW_ATTEMPT else logging.INFO
                log.log(level, "store %s: %s failed after %.0fs (%s); retry %d/%d in %.2fs",
                        self.url, what, took, e, attempt, self.attempts - 1, pause)
                self._sleep(pause)
        raise AssertionError("unreachable")

    # --- the Store interface ---------------------------------------------------------

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        self._put(key, lambda **kw: self.inner.put(key, data, **kw), exclusive, lambda: data)

    def put_file(self, key: str, path: str, *, exclusive: bool = False,
                 length: int | None = None) -> None:
        def content() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        self._put(key, lambda **kw: self.inner.put_file(key, path, length=length, **kw),
                  exclusive, content)

    def _put(self, key: str, put: Callable[..., None], exclusive: bool,
             content: Callable[[], bytes]) -> None:
        if not exclusive:
            return self._call(f"put {key}", put)
        outcome_unknown = False

        def unknown() -> None:
            nonlocal outcome_unknown
            outcome_unknown = True

        try:
            self._call(f"put {key}", lambda: put(exclusive=True), unknown)
        except ObjectExists:
            if not outcome_unknown:
                raise
            # An earlier attempt may have stored the object before failing.
            try:
                stored = self.get(key)
            except ObjectNotFound:
                raise ObjectExists(key) from None
            if stored != bytes(content()):
                raise
            log.info("store %s: exclusive put %s: found our own earlier attempt's object; "
                     "counting it as success", self.url, key)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return self._call(f"get {key}", lambda: self.inner.get(key, start, length))

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return self._call(f"get {key}", lambda: self.inner.get_ranges(key, ranges))

    def will_need(self, key: str, ranges: list[tuple[int, int | None]]) -> None:
        self.inner.will_need(key, ranges)     # a hint: nothing to retry

    def head(self, key: str) -> int:
        return self._call(f"head {key}", lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Materialize inside the retry so an error half-way through restarts the listing.
        return iter(self._call(f"list {prefix or '/'}", lambda: [*self.inner.list(prefix)]))

    def delete(self, key: str) -> None:
        return self._call(f"delete {key}", lambda: self.inner.delete(key))

    @property
    def conditional_writes(self) -> bool:
        return self.inner.conditional_writes

    def object_file(self, key: str) -> str | None:
        return self.inner.object_file(key)

    def layout_raw(self, key: str) -> bytes | None:
        return self.inner.layout_raw(key)

    def prime_layout(self, key: str, raw: bytes, stored_size: int) -> int | None:
        return self.inner.prime_layout(key, raw, stored_size)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"<RetryingStore {self.inner!r}>"
