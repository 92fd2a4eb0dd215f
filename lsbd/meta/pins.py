"""Which points of a volume are pinned: the seqs its snapshots and its live
clones stand on.  Compaction keeps a checkpoint at each; the checkpointer
never prunes one."""

from __future__ import annotations

from lsbd.meta.clones import live_clone_refs
from lsbd.meta.config import VolumeConfig
from lsbd.meta.snapshots import list_snapshots
from lsbd.store import Store


def pinned_points(store: Store, config: VolumeConfig) -> set[int]:
    """Seqs of the snapshots and live clone bases of a volume."""
    points = {s.seq for s in list_snapshots(store, config)}
    points |= {r.seq for r in live_clone_refs(store, config.name)}
    return {p for p in points if p > 0}
