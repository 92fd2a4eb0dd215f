"""Private files and directories, whatever the umask.

The cache dir holds a volume's map (which blocks were written, and when),
its journals and cached segments, and a local store holds the segments
themselves: only their owner may read them (docs/security.md).  lsbd makes
the directories it creates there 0700 and its files 0600."""

from __future__ import annotations

import contextlib
import errno
import os

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dirs(path: str, *, fix_existing: bool = True) -> None:
    """Make a directory and the parents it lacks, each private.
    fix_existing: a directory that is already there is made private too
    (one lsbd owns, made by an older version); never its parents, which
    may be anyone's (/var/tmp, a home)."""
    missing = []
    here = os.path.abspath(path)
    while not os.path.exists(here):
        missing.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            continue        # made meanwhile by another process: theirs
        os.chmod(folder, DIR_MODE)    # the umask may have taken bits from mkdir's mode
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    if fix_existing and not missing:
        with contextlib.suppress(OSError):    # not ours to change: it stays as it is
            if os.stat(path).st_mode & 0o777 != DIR_MODE:
                os.chmod(path, DIR_MODE)
