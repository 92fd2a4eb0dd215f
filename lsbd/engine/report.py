"""What a writer tells about itself without the store (which may be down):
`lsbd stats` (usage) and `lsbd info` (describe)."""

from __future__ import annotations

from lsbd.engine.state import VolumeState
from lsbd.map.blockmap import PENDING


def usage(st: VolumeState, *, read_defrag_bytes: int = 0,
          read_defrag_dropped_bytes: int = 0) -> dict:
    """Counters and space accounting, for `lsbd stats`."""
    infos = st.map.segments()
    up = st.uploader
    err = up.last_error if up else None
    data = {
        "volume": st.name, "size": st.size, "applied_seq": st.applied,
        "durable_seq": up.durable_seq if up else st.applied,
        "uploads_pending": up.pending if up else 0,
        "segments": len(infos), "segment_bytes": sum(i.size for i in infos),
        "live_bytes": sum(i.live_blocks for i in infos) * st.block_size,
        "extents": st.map.extent_count(), "map": st.map.map_stats(),
        "read_defrag_bytes": read_defrag_bytes,
        "read_defrag_dropped_bytes": read_defrag_dropped_bytes,
        "last_checkpoint": st.last_checkpoint, "flush_mode": st.flush_mode,
        "pending_bytes": sum(i.size for i in infos if i.state == PENDING),
        "upload_error": str(err) if err else None,
        "uploads_failing_for": round(up.failing_for(), 1) if up else 0.0,
        "cache_dir": st.folder,
    }
    data.update(st.files.cache_state())
    data.update(st.stats)
    return data


def describe(st: VolumeState) -> dict:
    """What `lsbd info` shows, as this writer knows it (no store call)."""
    c = st.config
    holder = st.lease.holder.describe() if st.lease is not None else None
    return {"name": c.name, "volume_id": c.volume_id, "size": st.size,
            "block_size": c.block_size, "created": c.created, "flush_mode": st.flush_mode,
            "segment_size": c.segment_size, "retain_seconds": c.retain_seconds,
            "parent": c.parent, "newest_seq": st.applied,
            "durable_seq": st.uploader.durable_seq if st.uploader else st.applied,
            "last_checkpoint": st.last_checkpoint, "writer": holder, "store": st.store.url}
