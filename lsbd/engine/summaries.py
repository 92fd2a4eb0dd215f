"""Writing the map summary at a writer's clean close (lsbd.segments.summary):
the indexes of the segments after the last checkpoint in one object, so
that the next open on a new cache dir reads one object, not one per
segment.  One PUT, and only when the session stored segments."""

from __future__ import annotations

import logging
import os

from lsbd import names
from lsbd.engine.state import VolumeState
from lsbd.errors import CorruptionError, LeaseLost, StoreError
from lsbd.format.segment import TRAILER, read_sealed_footer_from
from lsbd.map.blockmap import STORED
from lsbd.segments import summary
from lsbd.segments.locallength import local_segment_size
from lsbd.segments.remote import store_segments

log = logging.getLogger(__name__)

#: A summary holds entries up to about this many bytes (the oldest segments
#: first; the others are read from the store as before): a segment of 4 KiB
#: random writes has an index of some 230 KiB, and a summary is read whole.
SUMMARY_BYTES = 16 << 20


def write_summary(st: VolumeState) -> bool:
    """Write the summary of the stored segments after the last checkpoint
    whose index is at hand (its local file; for a sealed volume its layout
    too), if the store tags objects.  True if it was written.  A failure
    costs the next cold open its GETs, nothing else: it is logged."""
    if not st.store.lists_etags:
        return False
    seqs = [s.seq for s in st.map.segments()
            if s.state == STORED and s.seq > max(st.last_checkpoint, st.config.base_seq)]
    if not seqs:
        return False
    try:
        listing = store_segments(st.store, st.name)
        entries, total = [], 0
        for seq in sorted(seqs):
            e = _entry(st, seq, listing.get(seq))
            if e is None:
                continue
            total += len(e.index) + len(e.layout) + len(e.trailer) + 64
            if total > SUMMARY_BYTES:
                break
            entries.append(e)
        if not entries:
            return False
        st.check_lease()    # a writer that lost the lease writes nothing more
        summary.write(st.store, st.name, st.config.volume_id_bytes, entries)
        return True
    except LeaseLost as e:
        log.warning("volume %s: map summary not written: %s", st.name, e)
    except StoreError as e:
        log.warning("volume %s: map summary not written (%s): the next open on a new cache "
                    "dir reads each segment's index", st.name, e)
    return False


def _entry(st: VolumeState, seq: int, info) -> summary.Entry | None:
    if info is None or not info.etag:
        return None
    key = names.segment_key(st.name, seq)
    layout = st.store.layout_raw(key)
    if layout is None:
        layout = b""        # stored as it is: the index alone finds its blocks
    elif not layout:
        return None         # sealed, and its layout is no longer kept
    try:
        r = st.files.open_reader(seq)
    except (OSError, CorruptionError):
        return None     # evicted from the cache dir: its index is not at hand
    try:
        size = local_segment_size(r)
        trailer, index = read_sealed_footer_from(r.pread, size, where=key)
        raw_trailer = r.pread(TRAILER.size, size - TRAILER.size)
    except (OSError, CorruptionError):
        return None
    finally:
        os.close(r.fd)
    if trailer.seq != seq:
        return None
    return summary.Entry(seq, info.size, info.etag, bytes(raw_trailer), bytes(index), layout)
