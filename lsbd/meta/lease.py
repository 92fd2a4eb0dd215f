"""The writer lease: at most one writer per volume (docs/durability.md, "One writer").

A small object taken with a conditional create, naming its holder.  A lease
left by a process that died on this same machine is taken over on the next
open without any flag; one held by another machine needs --break-lease.  A
lease whose holder is a live process on this machine is never broken: that
process must be stopped instead (breaking it would leave two writers on one
cache dir).

On a store that ignores conditional creates (Store.conditional_writes is
False) the lease is read before it is put and read back once the put has
settled (lsbd.store.settle), so a second writer is refused; the writer's
uploads are fenced by the lease as everywhere (lsbd.segments.uploader), and
read their trailer back.

The machine is named by its host name, or by LSBD_HOST when that is set (so
that tests can stand for two machines on one)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid

import attrs

from lsbd import names
from lsbd.errors import LeaseHeld, LeaseLost, ObjectExists, ObjectNotFound
from lsbd.store import Store
from lsbd.store.settle import settle

log = logging.getLogger(__name__)


def host_name() -> str:
    """This machine's name in leases."""
    return os.environ.get("LSBD_HOST") or socket.gethostname()


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


def _command_line(pid: int) -> str:
    """A live process's command line, shortened, '' if unknown."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return ""
    words = [os.path.basename(a.decode(errors="replace")) if i == 0 else
             a.decode(errors="replace") for i, a in enumerate(args) if a]
    # `python .../lsbd mount ...`: show it as `lsbd mount ...`
    for i, w in enumerate(words):
        if os.path.basename(w) == "lsbd":
            words = ["lsbd", *words[i + 1:]]
            break
    text = " ".join(" ".join(words).split())   # one line
    return text if len(text) <= 80 else text[:77] + "..."


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

    def _on_this_boot(self) -> bool:
        return self.host == host_name() and bool(self.boot_id) and self.boot_id == _boot_id()

    def is_dead_local_process(self) -> bool:
        """True only when we can be sure: same machine, same boot, and that pid
        is gone or now belongs to a different process (or is this process,
        which no longer holds it: a volume abandoned as a crash would)."""
        if not self._on_this_boot():
            return False
        if self.pid == os.getpid() and _process_start(self.pid) == self.process_start:
            return self.token not in _held_here
        return _process_start(self.pid) != self.process_start

    def is_live_local_process(self) -> bool:
        """The holder is a process running on this machine right now."""
        return self._on_this_boot() and bool(self.process_start) \
            and not self.is_dead_local_process()

    def live_local_advice(self, volume: str) -> str:
        """What to say when a live process of this machine holds the lease."""
        command = _command_line(self.pid)
        what = f" ({command})" if command else ""
        if self.pid == os.getpid():
            return (f"volume {volume!r} is already open for writing in this process "
                    f"(pid {self.pid} on {self.host})")
        return (f"volume {volume!r} is in use by pid {self.pid}{what} on this machine "
                f"({self.host}): stop it first (`lsbd umount MOUNTPOINT` for a mount, "
                f"Ctrl-C or `kill {self.pid}` for `lsbd serve`); "
                "--break-lease never takes a lease from a live process")


#: Tokens of the leases this process holds (a volume abandoned as a crash
#: would leave no longer holds its lease, though the process lives on).
_held_here: set[str] = set()


class Lease:
    def __init__(self, store: Store, volume: str, holder: LeaseHolder):
        self.store = store
        self.volume = volume
        self.holder = holder
        _held_here.add(holder.token)

    def abandon(self) -> None:
        """Stop holding the lease as a crashed process would: it stays in
        the store, and its holder now counts as dead."""
        _held_here.discard(self.holder.token)

    @classmethod
    def acquire(cls, store: Store, volume: str, *, break_lease: bool = False) -> "Lease":
        pid = os.getpid()
        me = LeaseHolder(host=host_name(), pid=pid, since=time.time(),
                         token=uuid.uuid4().hex, boot_id=_boot_id(),
                         process_start=_process_start(pid))
        key = names.lease_key(volume)
        conditional = store.conditional_writes
        # A lease this process is still taking is live, not left over:
        # another thread racing for it must not take it over.
        _held_here.add(me.token)
        try:
            for _attempt in range(3):
                # A store that ignores conditional creates would let our put
                # replace a live holder's lease: look first there.
                current = None if conditional else read_holder(store, volume)
                if current is None:
                    try:
                        store.put(key, json.dumps(attrs.asdict(me)).encode(), exclusive=True)
                        if conditional or cls._won(store, volume, me):
                            return cls(store, volume, me)
                    except ObjectExists:
                        pass
                    current = read_holder(store, volume)
                    if current is None:
                        continue  # released while we looked: try again
                if current.is_live_local_process():
                    raise LeaseHeld(current.live_local_advice(volume))
                if break_lease:
                    log.warning("breaking the lease of volume %s held by %s", volume, current.describe())
                elif current.is_dead_local_process():
                    log.warning("taking over the lease of volume %s left by %s, which has exited",
                                volume, current.describe())
                else:
                    raise LeaseHeld(f"volume {volume!r} is in use by {current.describe()}; "
                                    "if that process or machine is gone, add --break-lease")
                store.delete(key)
            raise LeaseHeld(f"volume {volume!r}: could not take the writer lease (another writer "
                            "is racing for it)")
        except BaseException:
            _held_here.discard(me.token)
            raise

    @staticmethod
    def _won(store: Store, volume: str, me: LeaseHolder) -> bool:
        """Without conditional creates, two writers that both found no lease
        both put theirs, and the later put wins.  Read it back once a racing
        put has had time to land: only the winner finds its own token."""
        settle()
        holder = read_holder(store, volume)
        return holder is not None and holder.token == me.token

    def still_ours(self) -> bool:
        current = read_holder(self.store, self.volume)
        return current is not None and current.token == self.holder.token

    def check(self) -> None:
        """Raise LeaseLost if another writer took the lease (a StoreError if
        the store cannot be asked: that says nothing either way)."""
        current = read_holder(self.store, self.volume)
        if current is not None and current.token == self.holder.token:
            return
        who = f"now held by {current.describe()}" if current is not None else "released since"
        raise LeaseLost(f"volume {self.volume}: the writer lease was broken ({who}); this "
                        "writer stops taking writes and uploads nothing more (what it had not "
                        "uploaded stays in its cache dir, set aside on its next open)")

    @classmethod
    @contextlib.contextmanager
    def held(cls, store: Store, volume: str, *, break_lease: bool = False,
             doing: str | None = None):
        """Hold the lease for a short change to a volume's objects made
        without opening it (delete, a config change).  doing: the command,
        for a change that has no --break-lease (it must run where the
        writer runs)."""
        try:
            lease = cls.acquire(store, volume, break_lease=break_lease)
        except LeaseHeld as e:
            if doing is None or "--break-lease" not in str(e):
                raise
            holder = read_holder(store, volume)
            if holder is not None and holder.is_live_local_process():
                raise   # it says which process of this machine to stop
            who = holder.describe() if holder is not None else "another writer"
            raise LeaseHeld(f"volume {volume!r} is in use by {who}: run `{doing}` "
                            "on that machine") from None
        try:
            yield lease
        finally:
            lease.release()

    def release(self) -> None:
        if self.still_ours():
            self.store.delete(names.lease_key(self.volume))
        _held_here.discard(self.holder.token)


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
