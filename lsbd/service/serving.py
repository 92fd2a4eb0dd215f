"""Opening the devices a server shows (NBD exports, FUSE image files): each
volume, live or at a past point, and optionally each of its snapshots,
read-only.  One job for `lsbd serve` and `lsbd mount`."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import attrs

from lsbd.history import compactor
from lsbd.meta.config import VolumeConfig, load_config
from lsbd.meta.snapshots import list_snapshots
from lsbd.engine.volume import Volume
from lsbd.errors import UserError
from lsbd.history.points import resolve
from lsbd.store import Store


@attrs.frozen(kw_only=True)
class Device:
    volume: str                 # the volume's name
    snapshot: str | None        # the snapshot shown, or None for the volume itself
    device: Volume
    read_only: bool


@attrs.frozen(kw_only=True)
class Point:
    snapshot: str | None = None
    seq: int | None = None
    at: str | None = None


def open_devices(store: Store, volumes: list[str], *, cache_root: str, point: Point = Point(),
                 read_only: bool = False, break_lease: bool = False,
                 flush_mode: str | None = None, options: dict | None = None,
                 snapshots: bool = False,
                 prepare: Callable[[str], None] | None = None,
                 configs: Mapping[str, VolumeConfig] | None = None) -> list[Device]:
    """Open each volume (for writing unless read_only, or read-only at the
    point named) and, with snapshots=True, each of its snapshots read-only.
    options: more Volume.open options for a writer (auto_compact,
    cache_limit).  prepare(name) runs before a volume is opened (the
    caller's checks, such as unlocking an encrypted volume's keys).
    configs: the settings of volumes the caller has just read (not read
    again).  On failure, whatever was opened is closed again."""
    if len(set(volumes)) != len(volumes):
        raise UserError("a volume is named twice")
    devices: list[Device] = []
    lister = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsbd-snapshots")
    try:
        for name in volumes:
            config = (configs or {}).get(name) or load_config(store, name)
            if prepare is not None:
                prepare(name)
            # Listed while the volume opens: a round trip less to wait for.
            snaps = lister.submit(list_snapshots, store, config) if snapshots else None
            seq = resolve(store, config, snapshot=point.snapshot, seq=point.seq, at=point.at)
            if seq is not None:
                devices.append(Device(volume=name, snapshot=None, read_only=True,
                                      device=Volume.open(store, name, cache_root=cache_root,
                                                         at_seq=seq, config=config)))
            else:
                opts = dict(options or {})
                auto = opts.pop("auto_compact", False)
                device = Volume.open(store, name, cache_root=cache_root, read_only=read_only,
                                     break_lease=break_lease, flush_mode=flush_mode,
                                     config=config, **opts)
                if not device.read_only:
                    compactor.attach(device, auto=auto)   # the control socket, and auto
                devices.append(Device(volume=name, snapshot=None, read_only=read_only,
                                      device=device))
            if snaps is not None:
                for snap in snaps.result():
                    devices.append(Device(volume=name, snapshot=snap.name, read_only=True,
                                          device=Volume.open(store, name, cache_root=cache_root,
                                                             at_seq=snap.seq, config=config)))
    except BaseException:
        for d in devices:
            # The first error is the one to report.
            with contextlib.suppress(Exception):
                d.device.close()
        raise
    finally:
        lister.shutdown(wait=True, cancel_futures=True)
    return devices
