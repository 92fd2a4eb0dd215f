"""Errors of the NBD front end, and the one place that turns an exception
raised by the engine into an NBD error number."""

from __future__ import annotations

import errno as _errno

from lsbd.errors import CorruptionError, InvalidRequest, ReadOnlyError, StoreError
from lsbd_nbd import protocol as p


class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends its connection (bad
    magic, impossible lengths, EOF in the middle of a message)."""


class Disconnect(Exception):
    """The peer closed the connection cleanly (EOF between messages)."""


# Linux errno -> the protocol's restricted set.
_ERRNO_TO_NBD = {
    _errno.EPERM: p.EPERM,
    _errno.EACCES: p.EPERM,
    _errno.EROFS: p.EPERM,
    _errno.EIO: p.EIO,
    _errno.ENOMEM: p.ENOMEM,
    _errno.EINVAL: p.EINVAL,
    _errno.ENOSPC: p.ENOSPC,
    _errno.EDQUOT: p.ENOSPC,
    _errno.EFBIG: p.ENOSPC,
    _errno.EOVERFLOW: p.EINVAL,   # EOVERFLOW is only for READ with DF (spec)
    _errno.ESHUTDOWN: p.ESHUTDOWN,
}


def nbd_error(exc: BaseException) -> tuple[int, bool]:
    """Map an exception from an engine call to (NBD error, worth logging).

    The caller's mistakes (bad range, write to a read-only volume) are
    reported to the client and not logged as failures; anything else (the
    store failed, data failed its checksum, a bug) is an I/O error for the
    request and a log line on the server.
    """
    if isinstance(exc, ReadOnlyError):
        return p.EPERM, False
    if isinstance(exc, InvalidRequest):
        return p.EINVAL, False
    if isinstance(exc, CorruptionError):
        return p.EIO, True
    if isinstance(exc, StoreError):
        return _ERRNO_TO_NBD.get(exc.errno or _errno.EIO, p.EIO), True
    if isinstance(exc, MemoryError):
        return p.ENOMEM, True
    if isinstance(exc, OSError):
        return _ERRNO_TO_NBD.get(exc.errno or _errno.EIO, p.EIO), True
    if isinstance(exc, ValueError):
        return p.EINVAL, True
    return p.EIO, True
