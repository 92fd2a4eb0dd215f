"""The object store interface: the only thing the engine knows about where
objects live.  Keys are '/'-separated strings; objects are immutable byte
strings (the engine never rewrites one, except the small lease and config
objects).

Every method raises a StoreError subclass on failure:
  ObjectNotFound       get/head of a key that is not there
  ObjectExists         put(exclusive=True) of a key that is already there
  TransientStoreError  a failure worth retrying (network, throttling, 5xx)
  StoreError           anything else (permission, bad bucket, full disk)
"""

from __future__ import annotations

import abc
from typing import Iterator, NamedTuple, Sequence


class ObjectInfo(NamedTuple):
    key: str
    size: int
    #: The store's tag of this version of the object (S3's ETag), "" when the
    #: store gives none: an object written again under its key gets another.
    etag: str = ""


class Store(abc.ABC):
    """An object store.  Implementations must be safe to call from several threads."""

    url: str

    #: Whether list() gives each object's ETag (ObjectInfo.etag): a map
    #: summary's entries are matched to objects by it.  A wrapper takes its
    #: inner store's.
    lists_etags: bool = False

    #: Whether this store seals a compressed or encrypted volume's objects
    #: (lsbd.crypto.store.SealingStore): no other store may be given them.
    seals_objects: bool = False

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Store `data` under `key` atomically (readers see all or nothing).

        With exclusive=True the put is a conditional create: it fails with
        ObjectExists if the key already exists, and of two racing creators
        exactly one wins."""

    def put_file(self, key: str, path: str, *, exclusive: bool = False,
                 length: int | None = None) -> None:
        """Store the content of a local file that will never change again (a
        sealed segment).  A store may take it without copying (a hard link).
        length: the segment's length in the file, when the caller knows it;
        only a store that seals objects uses it (lsbd.crypto.store)."""
        with open(path, "rb") as f:
            data = f.read()
        self.put(key, data, exclusive=exclusive)

    @abc.abstractmethod
    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Read an object, or a range of it.

        start >= 0: bytes [start, start+length) (to the end if length is None);
        a range past the end is cut short, as with a file read.
        start < 0: the last -start bytes (length must be None)."""

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """get(key, start, length) of each range (start >= 0), in order.  A
        store that can read several ranges of an object for little more
        than one (a local file: one descriptor, the reads in one loop) does;
        by default, one get each (S3 has no multi-range GET that servers
        honour alike: a request a range is what it would make anyway)."""
        return [self.get(key, start, length) for start, length in ranges]

    def get_tail(self, key: str, n: int, *, stored_size: int | None = None) -> bytes:
        """The last `n` bytes of an object (all of it when shorter).
        stored_size: the object's size as a listing gives it, when known:
        then an explicit range, which every S3 server honours, rather than a
        suffix range."""
        if stored_size is None:
            return self.get(key, -n)
        start = max(0, stored_size - n)
        return self.get(key, start, stored_size - start)

    def will_need(self, key: str, ranges: list[tuple[int, int | None]]) -> None:  # noqa: B027
        """Ranges of an object (start, length, as get takes them) about to be
        read: a store on a local disk starts reading them now, all at once,
        so that the gets that follow find them read or on their way.  Only a
        hint: it fails silently, and by default does nothing."""

    @abc.abstractmethod
    def head(self, key: str) -> int:
        """The size of an object; ObjectNotFound if it is not there."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object.  Deleting a missing key is not an error."""

    @property
    def conditional_writes(self) -> bool:
        """Whether put(exclusive=True) is an atomic conditional create.  Some
        S3-compatible servers ignore the condition: the store then checks
        for the key before the put, which two racing creators can both pass
        (the engine guards its lease and segments against that itself)."""
        return True

    def object_file(self, key: str) -> str | None:
        """The local file that holds `key` byte for byte, if the store keeps
        its objects as files that a reader may link; None otherwise."""
        return None

    def layout_raw(self, key: str) -> bytes | None:
        """For a store that seals objects, the index frame and tail of `key`
        as stored, if it kept them (b"" if not); None when `key` is stored as
        it is, with no layout to keep."""
        return None

    def prime_layout(self, key: str, raw: bytes, stored_size: int) -> int | None:
        """For a store that seals objects, take back what layout_raw gave (from
        a map summary) so that the first ranged read of `key` needs no GET of
        its tail; returns the object's plain length.  None when the store
        stores objects as they are."""
        return None

    def exists(self, key: str) -> bool:
        from lsbd.errors import ObjectNotFound

        try:
            self.head(key)
            return True
        except ObjectNotFound:
            return False

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections; the store is not used afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
