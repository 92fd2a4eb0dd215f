"""The writer lease: at most one writer per volume (DESIGN invariant 7).

A small object taken with a conditional create, naming its holder.  A lease
left by a process that died on this same machine is taken over on the next
open without any flag; one held by another machine needs --break-lease."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

import attrs

from lsbd import names
from lsbd.errors import LeaseHeld, ObjectExists, ObjectNotFound
from lsbd.store import Store

log = logging.getLogger(__name__)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The start time of a process (clock ticks since boot), '' if it is gone.
    With the boot id it tells a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    if fields[0] in ("Z", "X"):  # dead, not yet reaped: it holds nothing
        return ""
    return fields[19]


@attrs.frozen(kw_only=True)
class LeaseHolder:
    host: str
    pid: int
    since: float
    token: str
    boot_id: str = ""
    process_start: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {when}"

    def is_dead_local_process(self) -> bool:
        """True only when we can be sure: same machine, same boot, and that pid
        is gone or now belongs to a different process."""
        if self.host != socket.gethostname() or not self.boot_id or self.boot_id != _boot_id():
            return False
        return _process_start(self.pid) != self.process_start


class Lease:
    def __init__(self, store: Store, volume: str, holder: LeaseHolder):
        self.store = store
        self.volume = volume
        self.holder = holder

    @classmethod
    def acquire(cls, store: Store, volume: str, *, break_lease: bool = False) -> "Lease":
        pid = os.getpid()
        me = LeaseHolder(host=socket.gethostname(), pid=pid, since=time.time(),
                         token=uuid.uuid4().hex, boot_id=_boot_id(),
                         process_start=_process_start(pid))
        key = names.lease_key(volume)
        for _attempt in range(3):
            try:
                store.put(key, json.dumps(attrs.asdict(me)).encode(), exclusive=True)
                return cls(store, volume, me)
            except ObjectExists:
                pass
            current = read_holder(store, volume)
            if current is None:
                continue  # released while we looked: try again
            if break_lease:
                log.warning("breaking the lease of volume %s held by %s", volume, current.describe())
            elif current.is_dead_local_process():
                log.warning("taking over the lease of volume %s left by %s, which has exited",
                            volume, current.describe())
            else:
                raise LeaseHeld(f"volume {volume!r} is in use by {current.describe()}; "
                                "if that machine is gone, open with --break-lease")
            store.delete(key)
        raise LeaseHeld(f"volume {volume!r}: could not take the writer lease (another writer "
                        "is racing for it)")

    def still_ours(self) -> bool:
        current = read_holder(self.store, self.volume)
        return current is not None and current.token == self.holder.token

    def release(self) -> None:
        if self.still_ours():
            self.store.delete(names.lease_key(self.volume))


def read_holder(store: Store, volume: str) -> LeaseHolder | None:
    try:
        raw = store.get(names.lease_key(volume))
    except ObjectNotFound:
        return None
    try:
        data = json.loads(raw)
        return LeaseHolder(**{k: data[k] for k in data if k in attrs.fields_dict(LeaseHolder)})
    except (ValueError, TypeError, KeyError):
        # An unreadable lease is still a lease: describe it as unknown.
        return LeaseHolder(host="unknown", pid=0, since=0.0, token="")
