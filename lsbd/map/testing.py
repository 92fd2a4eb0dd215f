"""Seams for tests: what a test (or a benchmark) needs to see or drive
inside a BlockMap.

Tests, and the engine's own seams (lsbd/engine/testing.py), reach the map's
private state only through these functions (a check in the suite refuses
`bm._anything` of the map's in them), so the map can change shape without
breaking them: when a piece moves, only this module follows.  Not for use
by the product."""

from __future__ import annotations

import contextlib
import subprocess
import time

from lsbd.map import merge, staged
from lsbd.map.blockmap import BlockMap, SegmentInfo


def segment_rows(bm: BlockMap) -> dict[int, int]:
    """Each segment's live blocks as its row in the map says (staged writes
    not added), those not 0."""
    with bm._env.begin(db=bm._segments) as txn:
        rows = [SegmentInfo.unpack(int.from_bytes(k, "big"), v) for k, v in txn.cursor()]
    return {i.seq: i.live_blocks for i in rows if i.live_blocks}


def commits(bm: BlockMap) -> int:
    """The write transactions the map's file has committed since it was
    made (each one a sync of that file)."""
    return bm._env.info()["last_txnid"]


def staged_values(bm: BlockMap) -> list[int]:
    """The seqs whose writes the map's `staged` database holds, in order
    (merging the last range deletes them)."""
    with bm._env.begin(db=bm._staged_db) as txn:
        return [int.from_bytes(k, "big") for k, _v in txn.cursor()]


def staged_writes(bm: BlockMap, upto: int) -> list[tuple]:
    """(seq, block numbers, file offsets) of each segment staged up to seq
    `upto`, as its staged value holds them (lsbd.map.staged.unpack)."""
    with bm._env.begin() as txn:
        return [(seq, *staged.unpack(v))
                for seq, v in merge._staged_upto(txn.cursor(db=bm._staged_db), upto)]


def staged_seqs(bm: BlockMap) -> list[int]:
    """The seqs staged and not yet merged, as the map holds them in memory."""
    return list(bm._staged_seqs)


def covers(bm: BlockMap) -> list[tuple]:
    """(seq, starts, ends) of the covers the map holds (lsbd.map.staged)."""
    with bm._env.begin() as txn:
        return bm._covers_in(txn)


def merging(bm: BlockMap) -> bool:
    """Whether a merge of staged segments is under way (some ranges done)."""
    return bm._merging is not None


def merge_steps(bm: BlockMap, steps: int) -> None:
    """Run `steps` ranges of the merge under way, as the sealer does
    between segments (in the map's process when there is one)."""
    bm._run_merge(steps)


def merge_upto(bm: BlockMap, upto: int, steps: int = 1 << 20) -> None:
    """Start a merge of the segments staged up to seq `upto`, from its
    first block, and run `steps` ranges of it."""
    bm._merging, bm._merge_from = upto, 0
    bm._run_merge(steps)


def last_txnid(bm: BlockMap) -> int:
    """The id of the map's last committed transaction (it moves with every
    commit that wrote something)."""
    return bm._env.info()["last_txnid"]


def has_map_process(bm: BlockMap) -> bool:
    """Whether requests go to the map's own process (offload_writes was
    called and the map has not given up on it)."""
    return bm._offload is not None


def map_process(bm: BlockMap) -> subprocess.Popen | None:
    """The map's process (lsbd.map.offload) as a Popen, or None when none runs."""
    off = bm._offload
    return off._proc if off is not None else None


def snapshots_held(bm: BlockMap) -> int:
    """How many read transactions (snapshots) of the map are open now: the
    slots of LMDB's reader table with a transaction id ("-" is a slot kept
    for a thread, holding nothing)."""
    # The reader table is the only place lmdb (py-lmdb 3.0) shows which
    # snapshots are open, and it shows it only as text: info()["num_readers"]
    # counts the slots ever used (it stays up after a transaction ends), and
    # reader_check() only clears slots of dead processes.
    table = bm._env.readers()
    return sum(1 for line in table.splitlines()[1:]
               if line.split() and line.split()[-1] != "-")


def overlays_one_block_entries(bm: BlockMap) -> bool:
    """Whether a scratch map's overlay() still takes its path for a map of
    one-block entries only (replacing entries without looking them up)."""
    return bm._singles


def overlay_record_by_record(bm: BlockMap) -> None:
    """Make a scratch map's overlay() lay records one by one from now on,
    as it does once a record of several blocks came."""
    bm._singles = False


def time_write_transactions(bm: BlockMap, inside: list[float], commit: list[float]) -> None:
    """From now on, time the map's write transactions in this process: each
    one's wall and thread CPU seconds from its begin to the end of its
    work are added to inside ([wall, cpu]), those of its commit to commit.
    For benchmarks: the transactions do the same work and commit, without
    the map's own steps around a commit (the kept reader dropped, the
    commit noted for the file's size)."""

    @contextlib.contextmanager
    def timed(db=None):
        t0, c0 = time.perf_counter(), time.thread_time()
        txn = bm._env.begin(write=True)
        yield txn
        t1, c1 = time.perf_counter(), time.thread_time()
        txn.commit()
        t2, c2 = time.perf_counter(), time.thread_time()
        inside[0] += t1 - t0
        inside[1] += c1 - c0
        commit[0] += t2 - t1
        commit[1] += c2 - c1

    bm._writing = timed  # type: ignore[method-assign]
