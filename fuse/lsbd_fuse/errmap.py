"""Engine errors to errno values, in one place.

Every engine call of the file system goes through `errno_for`, so every
request is answered with an errno the program doing I/O understands."""

from __future__ import annotations

import errno
import logging

from lsbd.errors import CorruptionError, InvalidRequest, ReadOnlyError, StoreError

log = logging.getLogger("lsbd.fuse")

#: errno values that mean the same to a program doing I/O on a file as they
#: do to the engine; anything else (ENOENT from a cache file, ECONNRESET
#: from the store, ...) is an I/O error as far as the image file is concerned.
PASSED_THROUGH = frozenset({errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOMEM})


def errno_for(exc: BaseException, what: str) -> int:
    """The errno to answer the kernel with for `exc`, logging it once.

    `what` names the request ("write VOL.img at 4096+512") for the log line.
    """
    if isinstance(exc, InvalidRequest):
        log.warning("%s: refused: %s", what, exc)
        return errno.EINVAL
    if isinstance(exc, ReadOnlyError):
        return errno.EROFS
    if isinstance(exc, CorruptionError):
        # The engine names the segment and offset; say which request hit it.
        where = f" (object {exc.key}, offset {exc.offset})" if exc.key else ""
        log.error("%s: stored data failed its checksum%s: %s", what, where, exc)
        return errno.EIO
    if isinstance(exc, StoreError):
        log.error("%s: store error: %s", what, exc)
        return exc.errno if exc.errno in PASSED_THROUGH else errno.EIO
    if isinstance(exc, OSError):
        log.error("%s: %s", what, exc)
        return exc.errno if exc.errno in PASSED_THROUGH else errno.EIO
    log.error("%s: unexpected error", what, exc_info=exc)
    return errno.EIO
