"""Snapshots: a name bound to a seq of a volume (a small object, no data)."""

from __future__ import annotations

import json
import re
import time

import attrs

from lsbd import names
from lsbd.errors import ObjectExists, ObjectNotFound, UserError
from lsbd.meta.config import VolumeConfig
from lsbd.store import Store

_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SnapshotExists(UserError, FileExistsError):
    pass


class SnapshotNotFound(UserError, FileNotFoundError):
    pass


@attrs.frozen(kw_only=True)
class Snapshot:
    name: str
    seq: int
    created: float
    volume_id: str

    def to_json(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode()


def check_snapshot_name(name: str) -> str:
    if not _SNAPSHOT_NAME.match(name or ""):
        raise UserError(f"bad snapshot name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def write_snapshot(store: Store, config: VolumeConfig, name: str, seq: int) -> Snapshot:
    snap = Snapshot(name=check_snapshot_name(name), seq=seq, created=time.time(),
                    volume_id=config.volume_id)
    try:
        store.put(names.snapshot_key(config.name, name), snap.to_json(), exclusive=True)
    except ObjectExists:
        raise SnapshotExists(f"volume {config.name} already has a snapshot {name!r}") from None
    return snap


def read_snapshot(store: Store, config: VolumeConfig, name: str) -> Snapshot:
    check_snapshot_name(name)
    try:
        data = json.loads(store.get(names.snapshot_key(config.name, name)))
    except ObjectNotFound:
        raise SnapshotNotFound(f"volume {config.name} has no snapshot {name!r}") from None
    return Snapshot(**data)


def list_snapshots(store: Store, config: VolumeConfig) -> list[Snapshot]:
    out = []
    for info in store.list(names.snapshot_prefix(config.name)):
        name = info.key.rsplit("/", 1)[-1]
        try:
            out.append(read_snapshot(store, config, name))
        except (SnapshotNotFound, ValueError, TypeError):
            continue
    return sorted(out, key=lambda s: (s.seq, s.name))


def delete_snapshot(store: Store, config: VolumeConfig, name: str) -> None:
    read_snapshot(store, config, name)  # a clear error if it is not there
    store.delete(names.snapshot_key(config.name, name))
