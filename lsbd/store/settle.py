"""The store's read-after-write allowance.

Some S3-compatible servers acknowledge a PUT before the object reads back
whole (s3rver answers once the body is received, not once it is on its
disk), and those same servers ignore conditional creates.  There the engine
tells its own object from a racing writer's by reading it back, and trusts
what it reads only once the put has had SETTLE_SECONDS to land: the lease
waits that long before it reads who won (lsbd.meta.lease), an upload reads
its segment's trailer back until it matches (lsbd.segments.uploader)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lsbd.errors import StoreError

#: Longer than a put can take, once acknowledged, to read back whole.
SETTLE_SECONDS = 1.0


def settle() -> None:
    """Wait out the allowance after a put, so that a racing put of the same
    key has landed too before the key is read."""
    time.sleep(SETTLE_SECONDS)


def reads_back(read: Callable[[], bytes], want: bytes, *,
               stop: threading.Event | None = None, what: str = "the object") -> bool:
    """Whether `read()` gives `want` within the allowance: read at once,
    then after pauses of a quarter, a half and the whole of it (the last
    read comes a whole allowance after the one before).  False when it
    still does not.  Raises StoreError if `stop` is set while waiting
    (closing: what was put is left for the next open to check)."""
    waits = (SETTLE_SECONDS / 4, SETTLE_SECONDS / 2, SETTLE_SECONDS)
    stop = stop or threading.Event()
    for wait in (*waits, None):
        if read() == want:
            return True
        if wait is not None and stop.wait(wait):
            raise StoreError(f"{what} did not read back as written before close")
    return False
