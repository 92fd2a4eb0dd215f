"""Deleting a whole volume: every object in the store, its clone reference
in the parent, and its cache dir; and a restore that leaves a whole new
volume or none."""

from __future__ import annotations

import logging
import shutil
from typing import Callable

from lsbd import names
from lsbd.meta.config import VolumeConfig, load_config
from lsbd.meta.lease import Lease
from lsbd.names import cache_dir_for
from lsbd.errors import StoreError, UserError
from lsbd.history.report import volume_info, volume_rows
from lsbd.service.writer import ask_writer
from lsbd.store import Store

log = logging.getLogger(__name__)


def live_clones(store: Store, name: str) -> list[str]:
    """The clones of `name` that still exist (they share its segments)."""
    clones = [i.key.rsplit("/", 1)[-1] for i in store.list(names.clone_prefix(name))]
    return [c for c in clones if store.exists(names.config_key(c))]


def delete_volume(store: Store, name: str, *, cache_root: str, break_lease: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Delete volume `name`; returns how many objects were deleted.  Refused
    while it has clones or a writer holds it."""
    config = load_config(store, name)
    clones = live_clones(store, config.name)
    if clones:
        raise UserError(f"volume {config.name!r} has clones that share its data "
                        f"({', '.join(clones)}): delete them first")
    # Taking the lease refuses to delete a volume in use (on this machine
    # even with --break-lease).
    Lease.acquire(store, config.name, break_lease=break_lease)
    keys = [info.key for info in store.list(names.volume_prefix(config.name))]
    # The config goes last: a half-deleted volume is still listed and deletable.
    keys.sort(key=lambda k: (k == names.config_key(config.name), k))
    for i, key in enumerate(keys):
        store.delete(key)
        if progress:
            progress(i + 1, len(keys))
    shutil.rmtree(cache_dir_for(cache_root, store, config.name), ignore_errors=True)
    if config.parent:
        store.delete(names.clone_ref_key(config.parent["volume"], config.name))
    return len(keys)


def restore_whole(store: Store, source: VolumeConfig, seq: int, name: str, *, cache_root: str,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """restore_volume, and on failure or Ctrl-C the new volume deleted again:
    a half restore would be listed and opened like a whole one, and would
    refuse the next restore to its name.  The source is only read."""
    from lsbd.history.restore import restore_volume     # the engine: only when restoring

    def remove(new: str) -> None:
        try:
            delete_volume(store, new, cache_root=cache_root)
        except Exception as e:  # noqa: BLE001 - the restore's own error is the one to report
            log.warning("the unfinished restore %s is left in the store (%s): "
                        "`lsbd delete %s` removes it", new, e, new)

    return restore_volume(store, source, seq, name, cache_root=cache_root, progress=progress,
                          remove=remove)


def describe_volume(store: Store, name: str, *, cache_root: str,
                    config: VolumeConfig | None = None,
                    store_error: StoreError | None = None) -> dict:
    """Settings and state of a volume, for `lsbd info`: from the store, and
    from its running writer when it is mounted or served here (the writer
    knows the newest state, and answers while the store is unreachable).
    `config`, when the caller has read it already, is not read again; nor is
    the store asked at all when the caller's reading of it just failed
    (`store_error`): a stalled store would cost its retries twice."""
    live = ask_writer(store, name, {"op": "info"}, cache_root=cache_root, timeout=30)
    try:
        if store_error is not None:
            raise store_error
        info = volume_info(store, name, config=config)
    except StoreError as e:
        if live is None:
            raise
        info = {**live, "segments": None, "stored_bytes": None, "checkpoints": None,
                "snapshots": None, "store_error": str(e)}
    if live is not None:
        for key in ("size", "newest_seq", "durable_seq", "writer"):
            info[key] = live[key]
        info["writer_exited"] = False
    return info


def list_volumes_now(store: Store, *, cache_root: str) -> list[dict]:
    """The volumes of the store, for `lsbd list`: the size of a volume in use
    here comes from its writer, as `lsbd info` shows it."""
    rows = volume_rows(store)
    for row in rows:
        live = ask_writer(store, row["name"], {"op": "info"}, cache_root=cache_root, timeout=30)
        if live is not None:
            row["size"], row["size_at_least"] = live["size"], False
    return rows
