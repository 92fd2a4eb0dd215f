"""The victim of the compaction crash tests (tests/crash/test_compact_crash.py):
opens a volume, compacts it, and SIGKILLs itself at a chosen moment.

    python tests/support/compact_child.py STORE_URL VOLUME CACHE_ROOT PLAN_JSON

PLAN_JSON names the moment:
    {"stage": "segput" | "ckptpart" | "ckptput" | "segdelete" | "ckptdelete" | "delay" | "none",
     "n": 3,                # the Nth matching store call made during compaction
     "when": "before",      # kill before the call reaches the store, or "after" it landed
     "delay": 0.1,          # for "delay": seconds after compaction starts
     "threshold": 0.6}

The store calls are counted only once the volume is open, so the kill lands
inside compaction: while the rewritten data uploads (segput), while the live
checkpoint is written (ckptpart, then its manifest: ckptput), or while old
segments and checkpoints are deleted (segdelete, ckptdelete).

On stdout: "R" once the volume is open; with stage "none" (a census run) the
compaction completes and a JSON line reports how many calls of each stage it
made and how long it took.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter

from lsbd import names
from lsbd.history.compactor import compact
from lsbd.engine.volume import Volume
from lsbd.store import open_store
from lsbd.store.base import Store


def stage_of(op: str, key: str, volume: str) -> str | None:
    if key.startswith(names.segment_prefix(volume)):
        return "segput" if op == "put" else "segdelete"
    if key.startswith(names.checkpoint_prefix(volume)):
        if op == "delete":
            return "ckptdelete"
        return "ckptput" if key.endswith("/manifest") else "ckptpart"
    return None


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


class KillingStore(Store):
    """Passes every call through; counts puts and deletes by stage once armed,
    and kills the process at the planned one."""

    def __init__(self, inner: Store, volume: str, plan: dict):
        self.inner = inner
        self.volume = volume
        self.plan = plan
        self.armed = False
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:  # type: ignore[override]
        return self.inner.url

    def _hit(self, op: str, key: str) -> bool:
        """Count the call; True if this is the one to die at."""
        if not self.armed:
            return False
        stage = stage_of(op, key, self.volume)
        if stage is None:
            return False
        with self._lock:
            self.counts[stage] += 1
            return stage == self.plan["stage"] and self.counts[stage] == self.plan["n"]

    def _call(self, op: str, key: str, fn):
        fatal = self._hit(op, key)
        if fatal and self.plan.get("when") == "before":
            die()
        result = fn()
        if fatal:
            die()
        return result

    def put(self, key, data, *, exclusive=False):
        return self._call("put", key, lambda: self.inner.put(key, data, exclusive=exclusive))

    def delete(self, key):
        return self._call("delete", key, lambda: self.inner.delete(key))

    def get(self, key, start=0, length=None):
        return self.inner.get(key, start, length)

    def head(self, key):
        return self.inner.head(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def close(self):
        self.inner.close()


def main() -> int:
    url, volume, cache_root, plan_text = sys.argv[1:5]
    plan = json.loads(plan_text)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if url.startswith("s3://") else None
    store = KillingStore(open_store(url, endpoint_url=endpoint), volume, plan)
    vol = Volume.open(store, volume, cache_root=cache_root)
    print("R", flush=True)
    store.armed = True
    if plan["stage"] == "delay":
        timer = threading.Timer(plan["delay"], die)
        timer.daemon = True
        timer.start()
    started = time.monotonic()
    report = compact(vol, threshold=plan.get("threshold", 0.6))
    seconds = time.monotonic() - started
    store.armed = False
    if plan["stage"] == "delay":
        timer.cancel()
    vol.close()
    print(json.dumps({"counts": dict(store.counts), "seconds": seconds,
                      "report": report.as_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
