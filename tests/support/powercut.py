"""A double of lsbd.fileio that keeps only what was synced and drops the
rest at a simulated power cut, as LevelDB's fault-injection env does.

SIGKILL keeps the page cache, so a killed process loses nothing it wrote:
it cannot show a missing fsync.  Under this double, everything under `root`
(the cache dir) that no sync made durable is gone after cut():

* a file's content is what it was at its last fsync/fdatasync through
  lsbd.fileio (empty if it was never synced);
* a directory holds the names it had at its last fsync through
  lsbd.fileio.fsync_dir (a new file whose directory was never synced is
  gone; a removed one whose removal was never synced is back, with its
  synced content);
* files are told apart by inode and generation (ext4 hands a freed inode
  to the next new file at once, under a new generation): a name never
  takes the bytes synced by another file that had its inode;
* an LMDB map goes back to what its flags promise: with sync and metasync,
  the last commit; with sync but not metasync (lsbd's setting), the one
  before it (the first commit after a cut goes back to the map as the cut
  left it; a map made since has nothing before its first commit); without
  sync, nothing (the map is lost).  env.sync() makes the last commit
  durable too.

Directories themselves count as durable.  Files are put back as new files
(a file:// store on the same file system may share their inodes)."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import struct
import threading

from lsbd import fileio

MAP_FILE = "data.mdb"
FS_IOC_GETVERSION = 0x80087601     # _IOR('v', 1, long): an inode's generation


def identity(fd: int) -> tuple[int, int]:
    """(inode, generation) of an open file: the generation changes when a
    freed inode is given to a new file (0 where the file system has none)."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf)
    except OSError:
        return os.fstat(fd).st_ino, 0
    return os.fstat(fd).st_ino, struct.unpack("<Q", buf)[0]


def path_identity(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return identity(fd)
    finally:
        os.close(fd)


class PowerCut:
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)
        self.lock = threading.RLock()
        self.frozen = False       # the power is off: no sync reaches the disk
        self.cuts = 0
        # (inode, generation) -> synced content
        self._data: dict[tuple[int, int], bytes] = {}
        # directory -> synced name -> (inode, generation)
        self._names: dict[str, dict[str, tuple[int, int]]] = {}
        self._maps: dict[str, dict] = {}              # map folder -> synced states
        self._saved: dict[str, object] = {}
        self._take_all()

    # --- installing ----------------------------------------------------------

    def install(self) -> "PowerCut":
        for name in ("fdatasync", "fsync", "fsync_dir", "map_committed"):
            self._saved[name] = getattr(fileio, name)
            setattr(fileio, name, getattr(self, name))
        return self

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(fileio, name, fn)
        self._saved.clear()

    def __enter__(self) -> "PowerCut":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # --- the durable points ----------------------------------------------------

    def _under(self, path: str) -> bool:
        path = os.path.realpath(path)
        return path == self.root or path.startswith(self.root + os.sep)

    def _dead(self) -> None:
        if self.frozen:
            raise OSError(5, "the power is off")

    def fdatasync(self, fd: int) -> None:
        with self.lock:
            self._dead()
            os.fdatasync(fd)
            self._take_fd(fd)

    def fsync(self, fd: int) -> None:
        with self.lock:
            self._dead()
            os.fsync(fd)
            self._take_fd(fd)

    def fsync_dir(self, path: str) -> None:
        with self.lock:
            self._dead()
            self._saved["fsync_dir"](path)
            if self._under(path):
                self._names[os.path.realpath(path)] = self._listing(path)

    def map_committed(self, path: str, env, synced: bool = False) -> None:
        with self.lock:
            self._dead()
            if not self._under(path):
                return
            flags = env.flags()
            # A map made since the last cut starts from nothing durable.
            state = self._maps.setdefault(os.path.realpath(path), {"last": None, "prev": None})
            with open(os.path.join(path, MAP_FILE), "rb") as f:
                now = f.read()
            state["prev"] = now if synced else state["last"]
            state["last"] = now
            state["sync"], state["metasync"] = flags["sync"], flags["metasync"]

    def _take_fd(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not self._under(path):
            return
        st = os.fstat(fd)
        self._data[identity(fd)] = os.pread(fd, st.st_size, 0) if st.st_size else b""

    # --- the cut -----------------------------------------------------------------

    def cut(self, stop) -> None:
        """Cut the power: from now on no sync succeeds; stop() ends the
        process's use of the cache dir (Volume.abandon); then the cache dir
        is what was synced, and the power comes back."""
        with self.lock:
            self.frozen = True
        stop()
        with self.lock:
            self._restore()
            self._take_all()
            self.frozen = False
            self.cuts += 1

    def settle(self) -> None:
        """Count everything on the disk now as synced: after a test removed
        files itself (a lost cache dir), which lsbd would not see come back."""
        with self.lock:
            self._take_all()

    def _restore(self) -> None:
        for folder, dirs, files in os.walk(self.root):
            folder = os.path.realpath(folder)
            if folder in self._maps or MAP_FILE in files:
                self._restore_map(folder)
                dirs[:] = []
                continue
            synced = self._names.get(folder, {})
            for name in files:
                path = os.path.join(folder, name)
                if name not in synced and not stat.S_ISDIR(os.lstat(path).st_mode):
                    os.unlink(path)
            for name, who in synced.items():
                path = os.path.join(folder, name)
                if os.path.lexists(path):
                    os.unlink(path)
                with open(path, "wb") as f:
                    f.write(self._data.get(who, b""))

    def _restore_map(self, folder: str) -> None:
        state = self._maps.get(folder)
        for name in os.listdir(folder):
            if name != MAP_FILE:
                os.unlink(os.path.join(folder, name))   # LMDB's lock file: rebuilt
        if state is None or "sync" not in state:
            return          # no commit since the cut before: as it was
        path = os.path.join(folder, MAP_FILE)
        if not state["sync"]:
            os.unlink(path)  # nothing of it was ever synced
            return
        keep = state["last"] if state["metasync"] else state["prev"]
        os.unlink(path)
        if keep is None:
            return          # a new map whose only commit is undone: none at all
        with open(path, "wb") as f:
            f.write(keep)

    def _take_all(self) -> None:
        """Everything on the disk now counts as synced."""
        self._data.clear()
        self._names.clear()
        self._maps.clear()
        for folder, dirs, files in os.walk(self.root):
            folder = os.path.realpath(folder)
            if MAP_FILE in files:
                # The map as it is now is durable: the first commit from
                # here on may be undone back to it.
                with open(os.path.join(folder, MAP_FILE), "rb") as f:
                    self._maps[folder] = {"last": f.read(), "prev": None}
                dirs[:] = []
                continue
            self._names[folder] = self._listing(folder)
            for name in files:
                path = os.path.join(folder, name)
                try:
                    with open(path, "rb") as f:
                        self._data[identity(f.fileno())] = f.read()
                except OSError:
                    pass    # a socket: not data

    @staticmethod
    def _listing(path: str) -> dict[str, tuple[int, int]]:
        out = {}
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False):
                try:
                    out[entry.name] = path_identity(entry.path)
                except FileNotFoundError:
                    pass    # removed meanwhile
        return out


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
