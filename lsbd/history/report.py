"""What the store says about a volume: its newest seq, its size now, the
rows of `lsbd info`, `lsbd list` and `lsbd log`.  Read-only; no volume is
opened."""

from __future__ import annotations

from lsbd.crypto import keystore
from lsbd.meta.config import VolumeConfig, list_volumes, load_config
from lsbd.meta.lease import read_holder
from lsbd.meta.snapshots import list_snapshots
from lsbd.plans.restore import recoverable
from lsbd.segments.checkpoints import list_checkpoints, read_manifest
from lsbd.segments.remote import fetch_segment_index, segment_times, store_segment_seqs
from lsbd.store import Store

#: A new line of `lsbd log` after a pause this long between two segments.
LOG_PAUSE_NS = 600 * 10**9


def newest_seq(store: Store, config: VolumeConfig, segments: dict[int, int] | None = None,
               checkpoints: list[int] | None = None) -> int:
    """The seq of the newest state in the store: its newest segment, or a
    newer checkpoint (compaction deletes a newest segment that holds no live
    block, such as one with only a resize), or a clone's base before its
    first segment."""
    if segments is None:
        segments = store_segment_seqs(store, config.name)
    if checkpoints is None:
        checkpoints = list_checkpoints(store, config.name)
    return max([*segments, *checkpoints, config.base_seq])


def current_size(store: Store, config: VolumeConfig, segments: dict[int, int] | None = None,
                 checkpoints: list[int] | None = None) -> int:
    """The volume's size in its newest state in the store (a resize is a
    record in the log, kept in the segment trailers and the checkpoints; the
    config keeps the size at creation)."""
    if segments is None:
        segments = store_segment_seqs(store, config.name)
    if checkpoints is None:
        checkpoints = list_checkpoints(store, config.name)
    top_segment = max(segments, default=0)
    top_checkpoint = max(checkpoints, default=0)
    if top_checkpoint > top_segment:
        return read_manifest(store, config.name, top_checkpoint).volume_size
    if top_segment:
        trailer, _records = fetch_segment_index(store, config.name, top_segment)
        return trailer.volume_size
    return config.size


def volume_rows(store: Store) -> list[dict]:
    """One row per volume of the store, for `lsbd list`.  The size of an
    encrypted volume is known only with its passphrase (resizes are in its
    sealed log): without it, the row gives the size at creation, which the
    volume has at least (volumes only grow), and says so."""
    rows = []
    for name in list_volumes(store):
        config = load_config(store, name)
        encrypted = bool(config.encryption)
        rows.append({"name": config.name,
                     "size": config.size if encrypted else current_size(store, config),
                     "size_at_least": encrypted,
                     "block_size": config.block_size, "created": config.created,
                     "volume_id": config.volume_id})
    return rows


def volume_info(store: Store, name: str, *, config: VolumeConfig | None = None) -> dict:
    """Settings and state of one volume, for `lsbd info` (its config read
    here unless given)."""
    config = config or load_config(store, name)
    segments = store_segment_seqs(store, config.name)
    checkpoints = list_checkpoints(store, config.name)
    holder = read_holder(store, config.name)
    return {
        "name": config.name, "volume_id": config.volume_id,
        "size": current_size(store, config, segments, checkpoints),
        "block_size": config.block_size, "created": config.created,
        "flush_mode": config.flush_mode, "segment_size": config.segment_size,
        "retain_seconds": config.retain_seconds,
        "segments": len(segments), "stored_bytes": sum(segments.values()),
        "newest_seq": newest_seq(store, config, segments, checkpoints),
        "checkpoints": checkpoints,
        "parent": config.parent,
        "snapshots": [{"name": s.name, "seq": s.seq} for s in list_snapshots(store, config)],
        "writer": None if holder is None else holder.describe(),
        # A process of this machine that died holding the lease: its journal
        # waits for the next mount or serve here.
        "writer_exited": holder is not None and holder.is_dead_local_process(),
        "store": store.url,
        "compression": config.compression,
        "encryption": config.encryption,
        # Which data key seals how many stored objects (read from each
        # object's tail: no passphrase needed); `lsbd key list` shows more.
        "data_keys_in_use": ({str(k): n for k, n in sorted(
            keystore.keys_in_use(getattr(store, "inner", store), config.name).items())}
            if config.encryption else {}),
    }


def log_rows(store: Store, config: VolumeConfig) -> list[dict]:
    """The recoverable history as ranges of seqs, for `lsbd log`: isolated
    points kept as checkpoints (snapshots, clone bases outside the window),
    then the window, cut into a new range after a checkpoint, a snapshot or
    a pause of 10 minutes."""
    times = segment_times(store, config)
    sizes = store_segment_seqs(store, config.name)
    checkpoints = set(list_checkpoints(store, config.name))
    snapshots = list_snapshots(store, config)
    snaps: dict[int, list[str]] = {}
    for s in snapshots:
        snaps.setdefault(s.seq, []).append(s.name)
    snap_times = {s.seq: s.created * 1e9 for s in snapshots}
    rows: list[dict] = []
    run: list[int] = []

    def close_run() -> None:
        if run:
            rows.append({"first": run[0], "last": run[-1], "segments": len(run),
                         "bytes": sum(sizes.get(s, 0) for s in run),
                         "from": times[run[0]] / 1e9, "to": times[run[-1]] / 1e9,
                         "checkpoints": sorted(checkpoints & set(run)),
                         "snapshots": sorted(n for s in run for n in snaps.get(s, []))})
            run.clear()

    isolated, window, _top = recoverable(checkpoints, sizes, base=config.base_seq)
    for seq in isolated:
        t = times.get(seq) or snap_times.get(seq) or 0
        rows.append({"first": seq, "last": seq, "segments": 0, "bytes": 0, "from": t / 1e9,
                     "to": t / 1e9, "checkpoints": [seq], "snapshots": snaps.get(seq, [])})
    for seq in sorted(s for s in times if s >= window):
        if run and (times[seq] - times[run[-1]] > LOG_PAUSE_NS or run[-1] in checkpoints
                    or run[-1] in snaps):
            close_run()
        run.append(seq)
    close_run()
    return rows
