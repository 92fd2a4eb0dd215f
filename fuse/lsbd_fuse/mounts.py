"""Where lsbd mounts are, which process serves each, and how to end one.

A serving process records itself in a pid file named after its mount point,
in a runtime directory that does not depend on the store or cache dir
(/run/lsbd for root, else $XDG_RUNTIME_DIR/lsbd or /tmp/lsbd-UID; $LSBD_RUN_DIR
overrides), so `lsbd umount MOUNTPOINT` needs no other flags.  The record
holds the pid and the process start time (a recycled pid is not mistaken for
ours) and, after the close, its error or what it left waiting for upload.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable

import attrs

from lsbd.errors import UserError

FSTYPE = "fuse.lsbd"
#: The inode of a FUSE mount's root folder (fixed by the protocol; tree.py's
#: ROOT_INODE, not imported: tree.py loads the engine, and `lsbd umount` needs none).
ROOT_INODE = 1
#: After `lsbd umount --timeout`: how long the process gets to stop waiting
#: for the store and close.
GIVE_UP_GRACE = 5.0


class MountError(UserError):
    """A mount or unmount could not be done; the message is one line for the user."""


# --- paths ---------------------------------------------------------------------

def run_dir() -> str:
    """The runtime directory; one that exists must be this user's and
    writable by no one else (see make_run_dir)."""
    override = os.environ.get("LSBD_RUN_DIR")
    if override:
        path = override
    elif os.geteuid() == 0:
        path = "/run/lsbd"
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        path = os.path.join(xdg, "lsbd") if xdg else f"/tmp/lsbd-{os.getuid()}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    # In /tmp another account can make /tmp/lsbd-UID first: its pid records
    # would have `lsbd umount` signal any process of ours, and a symlink
    # named like a mount's log would have the serving process append to
    # any file of ours.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise MountError(f"{path} is not a directory of this user that no one else can "
                         "write: remove it, or set LSBD_RUN_DIR to one")
    return path


def make_run_dir() -> str:
    """The runtime directory, made (0700) if missing."""
    os.makedirs(run_dir(), mode=0o700, exist_ok=True)
    return run_dir()


def canonical(mountpoint: str) -> str:
    """The absolute path of a mount point without touching it: a dead FUSE
    mount answers every stat with ENOTCONN, so only its parent is resolved."""
    path = os.path.abspath(mountpoint)
    parent, leaf = os.path.split(path)
    return os.path.join(os.path.realpath(parent), leaf) if leaf else path


def _key(mnt: str) -> str:
    return hashlib.sha256(mnt.encode()).hexdigest()[:16]


def pid_path(mountpoint: str) -> str:
    return os.path.join(run_dir(), _key(canonical(mountpoint)) + ".pid")


def log_path(mountpoint: str) -> str:
    return os.path.join(run_dir(), _key(canonical(mountpoint)) + ".log")


# --- the mount table -----------------------------------------------------------

@attrs.frozen(kw_only=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    major_minor: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) < 5 or len(b) < 2:
                continue
            entries.append(MountEntry(mountpoint=_unescape(a[4]), fstype=b[0],
                                      source=_unescape(b[1]), major_minor=a[2]))
    return entries


def find_mount(mountpoint: str) -> MountEntry | None:
    mnt = canonical(mountpoint)
    found = None
    for entry in mount_table():
        if entry.mountpoint == mnt:
            found = entry  # the last one is on top
    return found


# --- pid files -----------------------------------------------------------------

def _start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] in ("Z", "X"):
        return None  # exited, not yet reaped: its work is done
    return int(fields[19])


@attrs.frozen(kw_only=True)
class Server:
    pid: int
    start: int
    mountpoint: str
    name: str = ""
    log: str = ""
    error: str | None = None
    waiting: str | None = None     # what the close left in the cache dir for the next mount

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start


def write_pid_file(mountpoint: str, *, name: str, log: str = "") -> str:
    make_run_dir()
    path = pid_path(mountpoint)
    me = os.getpid()
    record = {"pid": me, "start": _start_time(me), "mountpoint": canonical(mountpoint),
              "name": name, "log": log}
    _write_record(path, record)
    return path


def expect_waiter(mountpoint: str) -> None:
    """`lsbd umount` (this process) waits for the mount's process: ask it to
    leave its close's outcome in the pid file."""
    path = pid_path(mountpoint)
    me = os.getpid()
    try:
        with open(path) as f:
            record = json.load(f)
        record["waiter"] = {"pid": me, "start": _start_time(me)}
        _write_record(path, record)
    except (OSError, ValueError):
        pass


def record_close_state(mountpoint: str, *, error: str | None, waiting: str | None) -> None:
    """Leave a failed close's error, and what it left waiting for upload, in
    the pid file for the `lsbd umount` that waits for it.  With none waiting
    (a plain umount, a signal) the pid file goes: the log says it all."""
    path = pid_path(mountpoint)
    try:
        with open(path) as f:
            record = json.load(f)
        waiter = record.get("waiter") or {}
        if not waiter or _start_time(int(waiter["pid"])) != waiter["start"]:
            os.unlink(path)
            return
        record.update(error=error, waiting=waiting)
        _write_record(path, record)
    except (OSError, ValueError, KeyError, TypeError):
        pass


def _write_record(path: str, record: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def remove_pid_file(mountpoint: str) -> None:
    try:
        os.unlink(pid_path(mountpoint))
    except FileNotFoundError:
        pass


def read_pid_file(mountpoint: str) -> Server | None:
    try:
        with open(pid_path(mountpoint)) as f:
            record = json.load(f)
        return Server(pid=int(record["pid"]), start=int(record["start"] or 0),
                      mountpoint=record.get("mountpoint", ""), name=record.get("name", ""),
                      log=record.get("log", ""), error=record.get("error"),
                      waiting=record.get("waiting"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def serving_image(path: str) -> tuple[Server, str] | None:
    """The running lsbd mount whose image the file at `path` is: the process
    that serves it and the image's name (`VOL.img`); None for any other file,
    or a mount whose pid file this user cannot read.  Found by the file's
    device (the mount's) and its folder being the mount's root (FUSE's
    inode 1), so a symlink or another path to it is found too."""
    try:
        st = os.stat(path)
        folder, name = os.path.split(os.path.realpath(path))
        root = os.stat(folder)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or root.st_dev != st.st_dev or root.st_ino != ROOT_INODE:
        return None
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for entry in mount_table():
        if entry.fstype != FSTYPE or entry.major_minor != device:
            continue
        try:
            server = read_pid_file(entry.mountpoint)
        except UserError:       # a run dir that is not ours: not our mount
            continue
        if server is not None and server.alive():
            return server, name
    return None


# --- checks before mounting -----------------------------------------------------

def _dead_mount_message(mnt: str) -> str:
    return (f"{mnt} is a dead FUSE mount (its server is gone): clean it up with "
            f"`fusermount3 -u -z {mnt}` (unmount what is on its loop device first)")


def check_can_mount(mountpoint: str) -> str:
    """Everything that can be checked before opening a volume; returns the
    canonical mount point or raises MountError with one clear line."""
    mnt = canonical(mountpoint)
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise MountError(f"mount point {mnt} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(_dead_mount_message(mnt)) from None
        raise MountError(f"mount point {mnt}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {mnt} is not a directory")
    entry = find_mount(mnt)
    if entry is not None and entry.fstype == FSTYPE:
        server = read_pid_file(mnt)
        if server is None or not server.alive():
            # The kernel may still answer stat from its cache: ask our pid file.
            raise MountError(_dead_mount_message(mnt))
        raise MountError(f"{mnt} is busy: it is already an lsbd mount (pid {server.pid})")
    if entry is not None:
        raise MountError(f"{mnt} is busy: it is already a {entry.fstype} mount")
    if not os.path.exists("/dev/fuse"):
        raise MountError("no /dev/fuse: load the fuse module (modprobe fuse) or give the "
                         "container the device")
    if os.geteuid() != 0:
        # fusermount3 (set-uid root) opens /dev/fuse for us.
        if not shutil.which("fusermount3"):
            raise MountError("fusermount3 is missing (install fuse3): it is needed to mount "
                             "without root")
        return mnt
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise MountError(f"cannot open /dev/fuse: {e.strerror}") from None
    return mnt


def entries_hidden(mnt: str) -> int:
    """What a mount on `mnt` hides: the entries in it (the kernel allows a
    mount on a directory that is not empty, as mount(8) does)."""
    try:
        return len(os.listdir(mnt))
    except OSError:
        return 0


# --- unmounting -------------------------------------------------------------------

def wait_for_exit(server: Server, timeout: float | None = None,
                  on_slow: Callable[[Server], None] | None = None) -> bool:
    """Wait until the serving process is gone; False on timeout."""
    start = time.monotonic()
    told = False
    while server.alive():
        waited = time.monotonic() - start
        if timeout is not None and waited > timeout:
            return False
        if on_slow is not None and not told and waited > 2.0:
            on_slow(server)
            told = True
        time.sleep(0.05)
    return True


def unmount(mountpoint: str, *, lazy: bool = False, wait: bool = True,
            timeout: float | None = None,
            on_slow: Callable[[Server], None] | None = None) -> Server | None:
    """Unmount an lsbd mount and wait until its process has closed the volume.

    Returns the server that was waited for (None if its pid was unknown).
    """
    mnt = canonical(mountpoint)
    entry = find_mount(mnt)
    if entry is None:
        raise MountError(f"{mnt} is not mounted")
    if entry.fstype != FSTYPE:
        raise MountError(f"{mnt} is not an lsbd mount (it is {entry.fstype})")
    server = read_pid_file(mnt)
    if server is not None and not server.alive():
        server = None
    if server is not None and wait:
        expect_waiter(mnt)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u", *(["-z"] if lazy else []), mnt]
    else:
        cmd = ["umount", *(["-l"] if lazy else []), mnt]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        text = msg[-1] if msg else f"{cmd[0]} failed"
        if "busy" in text.lower():
            raise MountError(f"{mnt} is busy: the image is still in use (a loop device or an "
                             "open file); unmount that first, or use --lazy")
        raise MountError(f"cannot unmount {mnt}: {text}")
    if server is None or not wait:
        return server
    stopped = False
    if not wait_for_exit(server, timeout, on_slow):
        # Past the bound: the process stops waiting for the store (as on a
        # second Ctrl-C); its close keeps the lease and says what waits.
        try:
            os.kill(server.pid, signal.SIGTERM)
            stopped = True
        except ProcessLookupError:
            pass
        if not wait_for_exit(server, GIVE_UP_GRACE):
            raise MountError(f"unmounted {mnt}, but lsbd (pid {server.pid}) is still closing "
                             f"the volume after {timeout:g} s (is the store reachable? its "
                             f"log: {server.log or log_path(mnt)}); what is not uploaded yet "
                             f"is safe in the cache dir and the next mount uploads it; "
                             f"`kill {server.pid}` stops it now")
    final = _leftover(mnt, server)
    if final is not None and (final.error or final.waiting):
        remove_pid_file(mnt)
        if final.error:
            raise MountError(f"unmounted {mnt}, but closing the volume failed: {final.error} "
                             "(the journal in the cache dir still holds the data: mount again "
                             "to finish the upload)")
        raise MountError(f"unmounted {mnt}, but the store did not take everything: "
                         f"{final.waiting}; the next mount uploads them (the lease stays "
                         "taken meanwhile)")
    if stopped and final is None:
        raise MountError(f"unmounted {mnt}; lsbd (pid {server.pid}) was still closing the "
                         f"volume after {timeout:g} s and was stopped (its log: "
                         f"{server.log or log_path(mnt)}); what is not uploaded yet is safe in "
                         "the cache dir and the next mount uploads it")
    return server


def _leftover(mnt: str, server: Server) -> Server | None:
    record = read_pid_file(mnt)
    if record is not None and record.pid == server.pid:
        return record
    return None
