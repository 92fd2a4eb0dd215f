"""The map's process (lsbd.map.offload): apply the batches its parent sends
until the parent closes our stdin."""

from __future__ import annotations

import gc
import os
import signal
import sys
import time

from lsbd import childproc, linux
from lsbd.map.blockmap import BlockMap


#: Tracked objects allocated (less those freed) before a collection: more
#: than one batch holds alive at once.
_GC_THRESHOLD = 100_000


def main() -> int:
    """The child's loop: apply batches until the parent closes our stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a ^C is for the parent to handle
    # Dead with the thread that started us: a batch received from a parent
    # killed since must not be committed after a new writer opened the map
    # (and perhaps moved on: compaction).
    linux.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != int(sys.argv[3]):
        return 0        # the parent died before the signal was set
    bm = BlockMap(sys.argv[1], int(sys.argv[2]), lookups=False)
    # A batch's records (up to 8,192 Records, tuples, when they are not all
    # one-block writes) die with it and hold no cycles: with the default
    # threshold the collector walked them several times a batch (about 5%
    # of this process's CPU when every batch came as Records).  What is
    # loaded now lives as long as we do: left out of collections.
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        while True:
            try:
                op, args = childproc.receive(stdin)
            except EOFError:
                return 0
            cpu = time.process_time()
            batch = None
            try:
                reply: tuple[str, object]
                if op == "merge":
                    nxt, emptied = bm.merge_ranges(*args)
                    reply = ("ok", (nxt, emptied, time.process_time() - cpu))
                else:
                    batch, meta = args
                    emptied = bm.apply_segments(batch, **meta)
                    reply = ("ok", (emptied, [info.live_blocks for info, _ in batch],
                                    time.process_time() - cpu))
            except OSError as e:     # its errno matters to the parent (a full disk)
                reply = ("oserror", (e.errno, f"{type(e).__name__}: {e}"))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
                reply = ("error", f"{type(e).__name__}: {e}")
            del batch
            childproc.send(stdout, reply)
    finally:
        bm.close()


if __name__ == "__main__":
    sys.exit(main())
