"""Ask the running writer of a volume, else open the volume and do it here.

Only one process writes a volume (it holds the lease).  While a volume is
mounted or served, that process listens on a control socket in its cache
dir; the commands that change or inspect a volume in use (snapshot,
checkpoint, compact, resize, stats, the live state of a clone) send it their
request there.  When nothing listens, the command opens the volume itself
and does the same operation (lsbd.engine.control.perform) on it."""

from __future__ import annotations

from typing import Any, Callable

import attrs

from lsbd.engine import control
from lsbd.history import compactor
from lsbd.meta.lease import Lease, read_holder
from lsbd.engine.volume import Volume
from lsbd.names import cache_dir_for
from lsbd.errors import LeaseHeld
from lsbd.store import Store


@attrs.frozen
class Outcome:
    value: Any              # JSON: a seq, or a report
    by_writer: bool         # True: the running writer did it


def control_path(store: Store, name: str, *, cache_root: str) -> str:
    """Where the writer of `name` (a mount or a server) listens for requests."""
    return control.socket_path(cache_dir_for(cache_root, store, name))


def ask_writer(store: Store, name: str, request: dict, *, cache_root: str,
               timeout: float = 300.0) -> Any:
    """The running writer's answer to `request`, or None if none runs here."""
    reply = control.call(control_path(store, name, cache_root=cache_root), request,
                         timeout=timeout)
    if reply is None:
        return None
    return reply["report"] if "report" in reply else reply["seq"]


def run_on_writer(store: Store, name: str, request: dict, *, cache_root: str,
                  read_only: bool = False, break_lease: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  timeout: float = 300.0,
                  prepare: Callable[[str], None] | None = None) -> Outcome:
    """Do `request` (a control operation: snapshot, checkpoint, flush, resize,
    stats, compact) through the running writer of `name`, or, when no
    writer runs on this machine, on the volume opened here (after
    prepare(name): the caller's checks, such as unlocking an encrypted
    volume's keys)."""
    answer = ask_writer(store, name, request, cache_root=cache_root, timeout=timeout)
    if answer is not None:
        return Outcome(answer, True)
    if prepare is not None:
        prepare(name)
    try:
        volume = Volume.open(store, name, cache_root=cache_root, read_only=read_only,
                             break_lease=break_lease)
    except LeaseHeld:
        holder = read_holder(store, name)
        if holder is not None and holder.is_live_local_process():
            # A writer of this machine using another cache dir: stop it
            # (never --break-lease: it would take a live writer's lease).
            raise LeaseHeld(holder.live_local_advice(name)) from None
        raise LeaseHeld(f"volume {name!r} is in use by "
                        f"{holder.describe() if holder else 'another writer'}, which cannot be "
                        f"asked from here: run the command on that machine (or --break-lease "
                        "if that writer is gone)") from None
    if not volume.read_only:
        compactor.attach(volume)
    with volume:
        return Outcome(control.perform(volume, request, progress=progress), False)


def run_on_writer_or_lease(store: Store, name: str, request: dict, local: Callable[[], None], *,
                           cache_root: str, doing: str) -> bool:
    """Do `request` through the running writer of `name`; when none runs
    here, call local() holding the lease (a short change to the volume's
    objects made without opening it: no writer can start meanwhile).
    Returns True when the writer did it."""
    if ask_writer(store, name, request, cache_root=cache_root) is not None:
        return True
    with Lease.held(store, name, doing=doing):
        local()
    return False
