"""Applying sealed segments to the map in a process of its own.

py-lmdb lets go of the GIL around every cursor call, about four times per
random 4 KiB write the map takes.  In the serving process each of those is
a hand-over to a thread answering requests and back: measured with
bench/map_bench.py at 3 and 8 million extents, a segment of 8,192 random
writes cost the map's thread 138 and 197 ms of CPU beside four busy
threads, against 44 and 56 ms alone (docs/scale.md).  Here one child
process (`python -m lsbd.map.offload_child PATH BLOCK_SIZE PARENT_PID`,
lsbd/map/offload_child.py, started by
BlockMap.offload_writes) opens the same LMDB environment and runs
BlockMap.apply_segments in it; the serving process only waits on a pipe.
LMDB serializes the two processes' write transactions with its own lock,
and the parent's other writes (segment states, meta) go on in-process.

The child dies with the thread that started it (the sealer's, or the
process): a batch whose parent was killed is never committed behind the
back of the next writer.

It also merges the staged segments into the extents (BlockMap.merge_ranges,
lsbd.map.merge), a few ranges a request: the staging itself is one small
transaction, which the parent commits.

Protocol, over the child's stdin and stdout: a u32 length and a pickled
("apply", (batch, meta)) or ("merge", (upto seq, from block, ranges, blocks a range)) in;
a u32 length and a pickled ("ok", (emptied, live blocks of each segment,
CPU seconds)), for a merge ("ok", (block to go on from or None, emptied,
CPU seconds)), ("oserror", (errno, message)) or ("error", message) out.
The child exits at the end of its input (its parent gone).

A commit is the child's; the parent learns of it from the reply.  If the
child dies or cannot start, the parent applies the batch itself: a batch
the child committed before dying is found applied (apply_segments skips a
batch whose last segment the map already records), so nothing is applied
twice.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import threading

from lsbd import childproc


#: Failures of the map's process in a row before writes stay in this process.
GIVE_UP_AFTER = 3


class OffloadUnavailable(Exception):
    """The map's process could not be started or died: apply here instead."""


class MapProcess:
    """The parent's side: one child for one map, one batch at a time."""

    def __init__(self, path: str, block_size: int):
        self.path = path
        self.block_size = block_size
        self.cpu_seconds = 0.0        # the child's CPU in the batches it applied
        self.failures = 0             # batches in a row the child could not apply
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        return childproc.start("lsbd.map.offload_child", self.path, str(self.block_size),
                               str(os.getpid()))

    def apply(self, batch: list, meta: dict[str, bytes]) -> tuple[list[int], list[int]]:
        """BlockMap.apply_segments(batch, **meta) in the child: (emptied
        segments, live blocks of each segment of the batch).  An OSError of
        the commit (a full disk) is raised as it is; OffloadUnavailable if
        the child could not do it (nothing of the batch may be committed,
        or all of it)."""
        emptied, live, cpu = self._ask(("apply", (batch, meta)))
        return emptied, live

    def merge(self, upto: int, start: int, steps: int,
              blocks: int) -> tuple[int | None, list[int]]:
        """BlockMap.merge_ranges(upto, start, steps, blocks) in the child: (the block
        to go on from, or None once merged; emptied segments).  Errors as
        apply()'s; a merge cut short is done again harmlessly."""
        nxt, emptied, _cpu = self._ask(("merge", (upto, start, steps, blocks)))
        return nxt, emptied

    def _ask(self, request: tuple) -> tuple:
        with self._lock:
            try:
                if self._proc is None:
                    self._proc = self._start()
                assert self._proc.stdin is not None and self._proc.stdout is not None
                childproc.send(self._proc.stdin, request)
                reply = childproc.receive(self._proc.stdout)
            except (EOFError, BrokenPipeError, pickle.PickleError, ValueError, OSError) as e:
                self._stop()
                self.failures += 1
                raise OffloadUnavailable(str(e) or type(e).__name__) from None
        value = childproc.reply_value(reply, "map process")
        self.failures = 0
        self.cpu_seconds += value[-1]
        return value

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        childproc.stop(proc, 30)     # it ends its transaction first

    def close(self) -> None:
        """Stop the child once its batch (if any) is committed."""
        with self._lock:
            self._stop()
