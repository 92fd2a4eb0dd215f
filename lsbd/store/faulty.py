"""FaultyStore: a wrapper that injects failures, for tests.

    store = FaultyStore(LocalStore(path))
    store.fail(op="put", key_prefix="vol/seg/", times=2)        # next 2 segment puts fail
    store.fail(op="get", error=StoreError, after=3)             # the 4th get fails, hard
    store.fail(op="put", lose_reply=True)                       # the put lands, the reply is lost
    store.corrupt_next_get()                                    # one flipped bit in the next get
    store.corrupt_next_get(2, key_prefix="vol/seg/")            # ... in the next 2 segment gets
    store.drop_puts_after(5)                                    # 5 more puts work, then none do
    store.ignore_conditions()                                   # exclusive puts overwrite
    store.heal()                                                # back to normal
    store.calls["put"], store.bytes_put                         # what was asked of the store

A rule matches calls by operation ("put", "get", "head", "list", "delete", or
None for any) and key prefix (for list: the listing prefix).  It lets the
first `after` matching calls through, then fails the next `times` of them
(times=None: for ever) by raising `error`: an exception class (built with a
message naming the op and key) or an instance.  Rules are checked in the
order they were added; a used-up rule is dropped.

Counters (`calls`, `bytes_put`, `bytes_got`) count every call made to this
wrapper, failed or not, so a test can measure the requests a piece of code
makes.  Everything is thread-safe.

Otherwise the wrapper does what the inner store does, so that a test through
it takes the store's own paths: its capabilities (lists_etags, seals_objects,
conditional_writes), put_file (a put: a file:// store links the file, a
sealing store seals it in its worker), get_tail (a get), exists (a head),
will_need and the sealed layouts.  Except object_file, which stays None: the
cache links a file:// store's files in only from an unwrapped store, so that
reads through this wrapper reach it (lsbd.segments.copies).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from lsbd.errors import ObjectExists, ObjectNotFound, StoreError, TransientStoreError
from lsbd.store.base import ObjectInfo, Store

OPS = ("put", "get", "head", "list", "delete")


@dataclass
class FaultRule:
    op: str | None
    key_prefix: str
    times: int | None
    error: type[BaseException] | BaseException
    after: int
    lose_reply: bool
    seen: int = 0      # matching calls so far
    fired: int = 0     # failures injected so far

    def used_up(self) -> bool:
        return self.times is not None and self.fired >= self.times


class FaultyStore(Store):
    def __init__(self, inner: Store):
        self.inner = inner
        # What the inner store can do, told truthfully: a test through this
        # wrapper takes the paths the inner store would (a listing's ETags
        # bring the map summary, lsbd.engine.summaries).  Declared on Store,
        # so these would otherwise be Store's defaults.
        self.lists_etags = inner.lists_etags
        self.seals_objects = inner.seals_objects
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._corrupt_gets = 0
        self._corrupt_prefix = ""
        self._puts_left: int | None = None
        self._blind_puts = False
        self.calls: Counter[str] = Counter()
        self.bytes_put = 0
        self.bytes_got = 0
        self.faults_injected = 0

    @property
    def url(self) -> str:  # type: ignore[override]
        return self.inner.url

    # --- configuring faults ---------------------------------------------------------

    def fail(self, op: str | None = "put", key_prefix: str = "", times: int | None = 1,
             error: type[BaseException] | BaseException = TransientStoreError, after: int = 0,
             lose_reply: bool = False) -> FaultRule:
        """Fail matching calls; see the module docstring.  With lose_reply=True the
        call is carried out on the inner store first and then fails, like a
        request that succeeded but whose reply never arrived (puts and deletes)."""
        if op is not None and op not in OPS:
            raise ValueError(f"unknown store op {op!r}")
        rule = FaultRule(op, key_prefix, times, error, after, lose_reply)
        with self._lock:
            self._rules.append(rule)
        return rule

    def corrupt_next_get(self, count: int = 1, key_prefix: str = "") -> None:
        """Flip one bit in the middle of the data the next `count` gets of
        keys starting with `key_prefix` return."""
        with self._lock:
            self._corrupt_gets += count
            self._corrupt_prefix = key_prefix

    def drop_puts_after(self, n: int | None) -> None:
        """Let `n` more puts through, then fail every put with StoreError, as if
        the network had gone away.  None switches it off."""
        with self._lock:
            self._puts_left = n

    def ignore_conditions(self) -> None:
        """Behave like a server that ignores If-None-Match and says so
        (conditional_writes is False): an exclusive put overwrites."""
        with self._lock:
            self._blind_puts = True

    def heal(self) -> None:
        """Remove every fault (counters are kept)."""
        with self._lock:
            self._rules.clear()
            self._corrupt_gets = 0
            self._puts_left = None

    def reset_counts(self) -> None:
        with self._lock:
            self.calls.clear()
            self.bytes_put = self.bytes_got = 0

    # --- the machinery --------------------------------------------------------------

    def _check(self, op: str, key: str) -> tuple[BaseException | None, bool]:
        """Count the call; return (the error to raise or None, whether it is
        raised after doing the call)."""
        with self._lock:
            self.calls[op] += 1
            if op == "put" and self._puts_left is not None:
                if self._puts_left <= 0:
                    self.faults_injected += 1
                    return StoreError(f"injected fault: network down (put {key})"), False
                self._puts_left -= 1
            for rule in self._rules:
                if rule.op not in (None, op) or not key.startswith(rule.key_prefix):
                    continue
                rule.seen += 1
                if rule.seen <= rule.after:
                    continue
                rule.fired += 1
                self.faults_injected += 1
                if rule.used_up():
                    self._rules.remove(rule)
                return _make_error(rule.error, op, key), rule.lose_reply
        return None, False

    def _run(self, op: str, key: str, fn):
        error, after_call = self._check(op, key)
        if error is not None and not after_call:
            raise error
        result = fn()
        if error is not None:
            raise error
        return result

    # --- the Store interface ---------------------------------------------------------

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        with self._lock:
            self.bytes_put += len(data)
            exclusive = exclusive and not self._blind_puts
        self._run("put", key, lambda: self.inner.put(key, data, exclusive=exclusive))

    def put_file(self, key: str, path: str, *, exclusive: bool = False,
                 length: int | None = None) -> None:
        # Passed on, not read into a put: the inner store may link the file
        # (file://) or seal it in its worker (lsbd.crypto.store).
        with self._lock:
            self.bytes_put += os.path.getsize(path) if length is None else length
            exclusive = exclusive and not self._blind_puts
        self._run("put", key, lambda: self.inner.put_file(key, path, exclusive=exclusive,
                                                          length=length))

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return self._got(key, self._run("get", key, lambda: self.inner.get(key, start, length)))

    def get_tail(self, key: str, n: int, *, stored_size: int | None = None) -> bytes:
        return self._got(key, self._run("get", key, lambda: self.inner.get_tail(
            key, n, stored_size=stored_size)))

    def _got(self, key: str, data: bytes) -> bytes:
        """Count a get's bytes, damaged if a corrupt_next_get asked for it."""
        with self._lock:
            self.bytes_got += len(data)
            corrupt = (self._corrupt_gets > 0 and len(data) > 0
                       and key.startswith(self._corrupt_prefix))
            if corrupt:
                self._corrupt_gets -= 1
        if corrupt:
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0x01
            data = bytes(damaged)
        return data

    def will_need(self, key: str, ranges: list[tuple[int, int | None]]) -> None:
        self.inner.will_need(key, ranges)     # a hint: nothing to fail or count

    def head(self, key: str) -> int:
        return self._run("head", key, lambda: self.inner.head(key))

    def exists(self, key: str) -> bool:
        try:
            return self._run("head", key, lambda: self.inner.exists(key))
        except ObjectNotFound:    # injected: as Store.exists takes a head's
            return False

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return iter(self._run("list", prefix, lambda: [*self.inner.list(prefix)]))

    def delete(self, key: str) -> None:
        self._run("delete", key, lambda: self.inner.delete(key))

    @property
    def conditional_writes(self) -> bool:
        return self.inner.conditional_writes and not self._blind_puts

    def layout_raw(self, key: str) -> bytes | None:
        return self.inner.layout_raw(key)

    def prime_layout(self, key: str, raw: bytes, stored_size: int) -> int | None:
        return self.inner.prime_layout(key, raw, stored_size)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"<FaultyStore {self.inner!r}>"


def _make_error(error: type[BaseException] | BaseException, op: str, key: str) -> BaseException:
    if isinstance(error, BaseException):
        return error
    if issubclass(error, (ObjectNotFound, ObjectExists)):
        return error(key)
    return error(f"injected fault: {op} {key}")
