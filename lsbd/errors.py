"""The error hierarchy.  One root, and each error also subclasses the builtin
a caller would naturally catch (ValueError, OSError, ...)."""

import errno


class LsbdError(Exception):
    """Root of every error lsbd raises on purpose."""


class UserError(LsbdError):
    """A mistake in what the user asked for; the CLI prints it as one line."""


# --- the object store -----------------------------------------------------

class StoreError(LsbdError, OSError):
    """The object store failed (I/O, network, permission)."""

    def __init__(self, message: str, err: int = errno.EIO):
        LsbdError.__init__(self, message)
        self.errno = err
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror or ""


class StoreNotFound(UserError, FileNotFoundError):
    """The store a URL names does not exist (a local directory never created)."""


class TransientStoreError(StoreError):
    """A failure that may go away if the same call is tried again."""


class ObjectNotFound(StoreError, FileNotFoundError):
    def __init__(self, key: str):
        super().__init__(f"object not found: {key}", errno.ENOENT)
        self.key = key


class ObjectExists(StoreError, FileExistsError):
    """A conditional create lost: the object is already there."""

    def __init__(self, key: str):
        super().__init__(f"object already exists: {key}", errno.EEXIST)
        self.key = key


# --- volumes ----------------------------------------------------------------

class VolumeNotFound(UserError, FileNotFoundError):
    pass


class VolumeExists(UserError, FileExistsError):
    pass


class LeaseHeld(UserError, PermissionError):
    """Another writer holds the volume."""


class LeaseLost(StoreError):
    """This writer's lease was broken (--break-lease elsewhere): it stops
    taking writes and never uploads again."""


class InvalidRequest(UserError, ValueError):
    """A read/write/trim with bad arguments (out of range, negative, ...)."""


class PointUnavailable(UserError, ValueError):
    """A point in a volume's history that does not exist or can no longer be
    rebuilt (before creation, in the future, reclaimed by compaction)."""


class ReadOnlyError(UserError, PermissionError):
    """A write to a read-only volume (a snapshot, a point in time)."""


class CorruptionError(LsbdError, OSError):
    """Stored data failed its checksum or does not parse.  Never returned as data."""

    def __init__(self, message: str, *, key: str | None = None, offset: int | None = None):
        LsbdError.__init__(self, message)
        self.errno = errno.EIO
        self.strerror = message
        self.key = key
        self.offset = offset

    def __str__(self) -> str:
        return self.strerror or ""


class WouldBlock(LsbdError, BlockingIOError):
    """A call made with nowait=True would have to wait for the store or an
    fsync; nothing was done.  The caller retries it where blocking is fine."""


class CacheMismatch(LsbdError):
    """The cache dir belongs to another volume, store or history."""
