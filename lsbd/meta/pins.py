"""Which points of a volume are pinned: the seqs its snapshots and its live
clones stand on.  Compaction keeps a checkpoint at each; the checkpointer
never prunes one."""

from __future__ import annotations

import json

from lsbd import names
from lsbd.errors import ObjectNotFound
from lsbd.meta.config import VolumeConfig
from lsbd.meta.snapshots import list_snapshots
from lsbd.store import Store


def pinned_points(store: Store, config: VolumeConfig) -> set[int]:
    """Seqs of the snapshots and clone bases of a volume."""
    points = {s.seq for s in list_snapshots(store, config)}
    for info in store.list(names.clone_prefix(config.name)):
        try:
            ref = json.loads(store.get(info.key))
        except (ObjectNotFound, ValueError):
            continue
        if store.exists(names.config_key(ref.get("clone", ""))):
            points.add(int(ref["seq"]))
    return {p for p in points if p > 0}
