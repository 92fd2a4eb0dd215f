"""`lsbd mount`: start serving, in the foreground or as a background process.

In the background the command forks (twice: the server is nobody's child) a
process that opens the volume (the engine starts threads, which must not be
forked) and mounts; the command waits on a pipe for one line: ``ok`` once the
mount is up, or ``error: MESSAGE``.  So the command returns only when the
mount is usable, and a failure (lease held, busy mount point, no /dev/fuse,
...) is one line and a non-zero exit.  The server's log goes to a file next
to its pid file (see `mounts`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Mapping

from lsbd import startahead
from lsbd.errors import LsbdError
from lsbd_fuse.mounts import MountError, check_can_mount, entries_hidden, log_path, make_run_dir
from lsbd_fuse.options import DIRECT_IO, READAHEAD
from lsbd_fuse.serve import serve
from lsbd_fuse.tree import Image

log = logging.getLogger("lsbd.fuse")

Opener = Callable[[], Mapping[str, Image]]

#: A mount point's log is rotated (once, to .log.1) when a mount starts and
#: it has grown past this.
LOG_LIMIT = 1 << 20


def describe(exc: BaseException) -> str:
    """One line for the user."""
    if isinstance(exc, LsbdError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def mark_io_flusher() -> bool:
    """Tell the kernel this process is in the I/O path (prctl PR_SET_IO_FLUSHER).

    A loop device over our image sends its writes through us; if one of our
    threads then needs memory and the kernel reclaims it by writing back the
    loop device's dirty pages, we would wait on ourselves.  The flag makes
    our allocations avoid I/O-based reclaim and exempts us from writeback
    throttling.  Inherited by the threads started afterwards (the engine's,
    the workers'), so it is set before the volume opens.  It needs
    CAP_SYS_RESOURCE; without it we go on as before.
    """
    from lsbd.linux import set_io_flusher
    try:
        set_io_flusher()
    except (OSError, AttributeError) as e:
        log.debug("PR_SET_IO_FLUSHER: %s", e)
        return False
    return True


def run(opener: Opener, mountpoint: str, *, name: str, foreground: bool = False,
        read_only: bool = False, direct_io: bool = DIRECT_IO,
        finalizer: Callable[[], None] | None = None, debug: bool = False,
        readahead: int = READAHEAD, while_waiting: Callable[[], None] | None = None) -> int:
    """Open the images with `opener` and serve them on `mountpoint`.

    Foreground: serve in this process until unmounted; returns its exit code.
    Background: return 0 once the mount is ready (the serving process goes on),
    or raise MountError with the reason it could not start.  while_waiting
    runs in this process while the serving process opens the images (work
    the caller would do after, done meanwhile on another core).
    """
    mnt = check_can_mount(mountpoint)
    hidden = entries_hidden(mnt)
    if hidden:
        log.warning("%s is not empty: its %d entr%s stay%s hidden while the volume is mounted",
                    mnt, hidden, "y" if hidden == 1 else "ies", "s" if hidden == 1 else "")
    if foreground:
        mark_io_flusher()
        try:
            images = opener()
            return serve(images, mnt, name=name, read_only=read_only, direct_io=direct_io,
                         debug=debug, readahead=readahead, on_ready=lambda: log.info(
                             "mounted %s on %s; stop with `lsbd umount %s`", name, mnt, mnt))
        finally:
            if finalizer is not None:
                finalizer()
    return _start_background(opener, mnt, name=name, read_only=read_only,
                             direct_io=direct_io, finalizer=finalizer, debug=debug,
                             readahead=readahead, while_waiting=while_waiting)


def _start_background(opener: Opener, mnt: str, *, name: str, read_only: bool,
                      direct_io: bool, finalizer: Callable[[], None] | None,
                      debug: bool, readahead: int,
                      while_waiting: Callable[[], None] | None = None) -> int:
    make_run_dir()
    logfile = log_path(mnt)
    try:
        if os.path.getsize(logfile) > LOG_LIMIT:
            os.replace(logfile, logfile + ".1")  # keep the previous mount's tail
    except FileNotFoundError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    startahead.finish()     # no thread of ours across the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the serving process, after a second fork (see below)
        code = 1
        try:
            os.close(r)
            # A new session, then fork again and let the middle process exit:
            # the server is nobody's child (init reaps it, our caller never
            # has to) and, not being a session leader, never gets a terminal.
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            code = _child(w, opener, mnt, name=name, read_only=read_only, direct_io=direct_io,
                          logfile=logfile, finalizer=finalizer, debug=debug,
                          readahead=readahead)
        except BaseException:  # never return into the parent's code
            with contextlib.suppress(BaseException):
                log.exception("the mount process failed")
        finally:
            logging.shutdown()
            os._exit(code)

    os.close(w)
    os.waitpid(pid, 0)  # the middle process, gone at once
    if while_waiting is not None:
        while_waiting()
    with os.fdopen(r, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "ok":
        return 0
    if line.startswith("error: "):
        raise MountError(line[len("error: "):])
    raise MountError(f"the mount process died before the mount was ready; see {logfile}")


def _detach(logfile: str) -> None:
    """Leave the caller's terminal and pipes: stdin from /dev/null, stdout and
    stderr to the log file."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    os.chdir("/")
    root = logging.getLogger()
    fmt = logging.Formatter(f"%(asctime)s lsbd[{os.getpid()}]: %(levelname)s: %(message)s")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        # Mount, unmount and close are worth a line in the log whatever -v says.
        logging.getLogger("lsbd.fuse").setLevel(logging.INFO)


def _child(w: int, opener: Opener, mnt: str, *, name: str, read_only: bool, direct_io: bool,
           logfile: str, finalizer: Callable[[], None] | None, debug: bool,
           readahead: int) -> int:
    _detach(logfile)
    mark_io_flusher()
    told = False

    def tell(line: str) -> None:
        nonlocal told
        if told:
            return
        told = True
        try:
            os.write(w, (line.replace("\n", " ") + "\n").encode())
            os.close(w)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise

    try:
        try:
            images = opener()
        except Exception as e:
            log.error("cannot open %s: %s", name, describe(e), exc_info=debug)
            tell(f"error: {describe(e)}")
            return 1
        try:
            return serve(images, mnt, name=name, read_only=read_only, direct_io=direct_io,
                         log_file=logfile, debug=debug, readahead=readahead,
                         on_ready=lambda: tell("ok"))
        except Exception as e:  # noqa: BLE001
            log.error("%s", describe(e))
            tell(f"error: {describe(e)}")
            return 1
    finally:
        tell("error: the mount process stopped before the mount was ready")
        if finalizer is not None:
            try:
                finalizer()
            except Exception:
                log.exception("cleanup failed")
