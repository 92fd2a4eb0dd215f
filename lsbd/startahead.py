"""Reading a start's files ahead, in parallel.

From a dropped page cache `lsbd mount` reads about 410 files before its
first request, one after another; behind another process's disk writes
each read waits, and the start took 1.2-2 s instead of 0.2 s
(docs/distant.md, "The attach's rare stall").  Here the files earlier
starts loaded (the modules' bytecode and extension files, a list kept in
the user's cache, one per interpreter) are asked for all at once at the
start, from a few threads: each open and POSIX_FADV_WILLNEED queues the
file's reads, so they wait behind the writes together, not in turn.
Besides the modules' files the list holds the shared libraries the process
maps (libpython, libssl, ...) and the data files it opens from the
interpreter's installation (botocore's JSON, about 2 MiB at each start),
which the start reads as well.  Only stdlib here: it runs before the other
imports."""

from __future__ import annotations

import hashlib
import os
import sys
import threading

#: Threads opening the files (an open reads the file's inode: it waits).
THREADS = 8
#: A list past this many files starts over (modules of old versions).
MAX_FILES = 4000

_stop = threading.Event()
_threads: list[threading.Thread] = []
#: The data files opened from the installation so far (watch_opens).
_opened: set[str] = set()
_watching = False


def list_path() -> str:
    """The list of this interpreter (and bytecode prefix): the paths differ."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = f"{sys.executable}\0{sys.version}\0{sys.pycache_prefix}"
    name = hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(base, "lsbd-start", name + ".list")


def _listed(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split("\n")
    except OSError:
        return []


def read_ahead() -> list[threading.Thread]:
    """Start reading the listed files ahead; never waits (the threads
    started are returned for tests)."""
    # The libraries the exec mapped (libpython, libc) are read already;
    # read ahead, the rest of libpython alone would be 20 MiB more.
    mapped = mapped_libraries()
    names = iter([n for n in _listed(list_path()) if n and n not in mapped])
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                name = None if _stop.is_set() else next(names, None)
            if name is None:
                return
            try:    # never waits on a FIFO or a terminal: the list is only read ahead
                fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                continue    # gone since (an upgrade)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass        # not a file that can be read ahead
            finally:
                os.close(fd)

    _stop.clear()
    threads = [threading.Thread(target=work, name="lsbd-startahead", daemon=True)
               for _ in range(THREADS)]
    _threads.extend(threads)
    for t in threads:
        t.start()
    return threads


def finish() -> None:
    """Stop reading ahead and wait for the threads: a process about to fork
    has no thread of ours left (a fork copies locks another thread may
    hold, and Python 3.12 warns about forking a process with threads)."""
    _stop.set()
    while _threads:
        _threads.pop().join()


def install_dirs() -> tuple[str, ...]:
    """Where the interpreter and its packages live: what a start opens
    there, it opens at every start (unlike a store's objects or a cache
    dir's files)."""
    return tuple({os.path.join(p, "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


def watch_opens() -> None:
    """From now on, note the files opened for reading from the
    installation (an audit hook: it sees every open of Python code; once
    per process, a hook cannot be removed)."""
    global _watching
    if _watching:
        return
    _watching = True
    dirs = install_dirs()

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            if (isinstance(path, str) and path.startswith(dirs)
                    and flags & os.O_ACCMODE == os.O_RDONLY):
                _opened.add(path)

    sys.addaudithook(hook)


def mapped_libraries() -> set[str]:
    """The shared libraries mapped into this process, which the dynamic
    linker read at the start (a map of another kind, a volume's block
    map, is no start's file)."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                path = fields[5].rstrip("\n") if len(fields) == 6 else ""
                if path.startswith("/") and ".so" in os.path.basename(path) \
                        and not path.endswith(" (deleted)"):
                    libs.add(path)
    except OSError:
        pass        # no /proc: the modules' files only
    return libs


def loaded_files() -> set[str]:
    """The files of the modules loaded so far: the bytecode of a module
    from source (the source is only looked at, not read), else the
    module's file (an extension's)."""
    files = set()
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        if spec is None or not spec.has_location:
            continue
        name = spec.cached or spec.origin
        if name:
            files.add(name)
    return files


def record() -> None:
    """Add this start's files to the list (rewritten only when it grows:
    otherwise a read of the list and a comparison, under a millisecond)."""
    path = list_path()
    old = {n for n in _listed(path) if n}
    new = loaded_files() | mapped_libraries() | set(_opened)
    if new <= old:
        return
    names = old | new if len(old | new) <= MAX_FILES else new
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("\n".join(sorted(names)) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass    # a read-only home: starts just are not read ahead
