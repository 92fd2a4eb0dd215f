"""Where a request runs: on the connection's own thread, or on the pool.

Every engine call blocks its caller.  A call that returns in microseconds (a
cached read, a journal append) is best run right on the connection's thread:
handing it to a worker costs more than the call itself (measured with fio,
4 KiB random writes over one connection against an in-memory volume: about
125k IOPS inline against about 23k through a thread pool; the GIL hand-offs
dominate).  So:

  * READ, small WRITE, TRIM and WRITE_ZEROES run inline with nowait=True
    when the device takes it (BlockDevice.supports_nowait): the engine then
    either finishes from local files or raises WouldBlock having done
    nothing (a cache miss waits for the store; so may a partial-block write,
    or any write while the engine is behind sealing segments), and only then
    does the request go to the pool, where it blocks as long as it needs and
    cache misses overlap.  A device without nowait runs them inline.
  * Once a READ of POOL_READ_FROM bytes or more found the cache cold, the
    next READS_AFTER_MISS such reads go straight to the pool, then one tries
    inline again.  A large read on a cold cache (a sequential reader after
    random writes: some thirty segments per MiB) spends milliseconds in
    its plan and first miss before it gives up, and the connection's thread
    then spends its time on that instead of taking the next requests:
    measured, fio's 16 reads in flight became three or four at the engine.
    On a device whose long reads run in turn (below), READS_AFTER_MISS_IN_TURN
    such reads: there each try planned a read (the map's walk, under the
    volume's lock) on the connection's thread while the lane planned and
    read another, the two trading the GIL and the lock, for a plan thrown
    away; one try in 65 instead of one in 9 took 8% off the server's
    processor time a MiB of a first pass after random writes (docs/scale.md,
    "Twenty-third round").  A warm reader is back inline within 64 long
    reads, which meanwhile run in the lane.
  * On a device whose long reads are processor work rather than waits
    (BlockDevice.long_reads_in_turn: a volume whose store is a local
    directory), the READs of POOL_READ_FROM bytes or more that go to the
    pool run in the connection's read lane: one pool thread runs them one
    after another, in the order they came.  Handed to the pool one by one,
    each woke a thread of its own that then waited at the engine's gate for
    long reads, two at a time, and those two traded the GIL at every frame
    they decompressed: measured with fio's sequential 1 MiB reads at
    iodepth 16 of a compressed region laid out in order, the server spent
    about 1.0 ms of processor per MiB that way, and about 0.7 in the lane
    (docs/scale.md, "Twenty-first round, second pass").  The lane hands
    each reply to the connection's sender thread, which sends it while the
    lane reads the next (at most one reply waits for it; transmission.py):
    the same reads went from about 1,580 to about 1,960 MiB/s
    (docs/scale.md, "Twenty-second round, second pass").  A distant store's
    reads wait on the network, so there they still overlap on the pool.
  * WRITE of POOL_WRITE_FROM bytes or more runs on the pool, so that the
    connection's thread receives the next payload while the engine writes
    (about 1 ms per MiB, much of it with the GIL released).  A connection's
    large writes run one after another on one pool thread: the engine
    writes one at a time under its lock, and more threads would only wait
    for it.  A 4 KiB write is not worth the hand-off.
  * FLUSH and anything with FUA run on the pool: they wait for an fsync or
    the store by definition, and the connection keeps reading meanwhile.
  * BLOCK_STATUS runs inline (the engine answers from its map).
"""

from __future__ import annotations

from lsbd.engine.api import BlockDevice

#: WRITEs this large or larger run on the pool.
POOL_WRITE_FROM = 128 * 1024
#: READs this large or larger skip the inline try after a cold one ...
POOL_READ_FROM = 128 * 1024
#: ... this many of them, then one tries again.
READS_AFTER_MISS = 8
#: ... or this many on a device whose long reads run in turn (the read
#: lane), where an inline try of a cold read plans it on the connection's
#: thread beside the lane (the GIL and the volume's lock, traded).
READS_AFTER_MISS_IN_TURN = 64


def reads_in_turn(device: BlockDevice) -> bool:
    """The device's long reads are best run one after another (see above)."""
    return getattr(device, "long_reads_in_turn", False) is True


def takes_nowait(device: BlockDevice) -> bool:
    """The device's read, write, write_zeroes and trim take nowait=True."""
    return getattr(device, "supports_nowait", False) is True
