"""Turn a store URL into a Store, with the standard wrappers around it."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from lsbd.errors import StoreNotFound, UserError
from lsbd.store.base import Store


def default_store_url() -> str:
    """The embedded default: a local directory under the user's data dir."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return "file://" + os.path.join(base, "lsbd", "store")


STORE_URL_FORMS = "file:///absolute/path, a path, or s3://bucket[/prefix]"


def check_store_url(url: str) -> str:
    """`url`, if it names a store lsbd can open (without opening it)."""
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.netloc:
        raise UserError(f"bad store URL {url!r}: write file:///absolute/path")
    if parsed.scheme == "s3" and not parsed.netloc:
        raise UserError(f"bad store URL {url!r}: write s3://bucket[/prefix]")
    if parsed.scheme not in ("", "file", "s3"):
        raise UserError(f"bad store URL {url!r}: unknown store kind {parsed.scheme!r}; "
                        f"use {STORE_URL_FORMS}")
    if not url:
        raise UserError(f"bad store URL '': use {STORE_URL_FORMS}")
    return url


def check_endpoint_url(url: str) -> str:
    """An S3 endpoint: http(s)://host[:port][/path]."""
    parsed = urlparse(url)
    try:
        good = parsed.scheme in ("http", "https") and bool(parsed.hostname) \
            and parsed.port != 0
    except ValueError:      # a port that is no number, or out of range
        good = False
    if not good:
        raise UserError(f"bad endpoint URL {url!r}: write http://HOST[:PORT] or "
                        "https://HOST[:PORT]")
    return url


def open_store(url: str | None = None, *, endpoint_url: str | None = None, retry: bool = True,
               retry_within: float | None = None, seal: bool = True, secret=None,
               create: bool = True) -> Store:
    """Open the store a URL names: file:///path, a plain path, or s3://bucket/prefix.

    seal: wrap it in lsbd.crypto.store.SealingStore, which compresses and
    encrypts the segments and checkpoints of the volumes whose settings ask
    for it; `secret(volume)` gives the passphrase or key file of an
    encrypted volume (without it, opening one is an error).
    create=False: a local directory that does not exist is an error (a
    mistyped path), not a new, empty store.
    retry_within: a request failing for this many seconds is not tried
    again (lsbd.store.retry.RetryingStore); None: every attempt is made."""
    if not url and os.environ.get("LSBD_STORE"):
        url = os.environ["LSBD_STORE"]
        try:
            check_store_url(url)
        except UserError as e:
            raise UserError(f"$LSBD_STORE: {e}") from None
    url = url or default_store_url()
    check_store_url(url)
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        from lsbd.store.local import LocalStore

        path = parsed.path if parsed.scheme == "file" else url
        if not create and not os.path.isdir(path):
            raise StoreNotFound(f"no store at {os.path.abspath(path)}: check --store or $LSBD_STORE "
                            "(`lsbd create` makes a new one)")
        store: Store = LocalStore(path)
    elif parsed.scheme == "s3":
        from lsbd.store.s3 import S3Store

        # With no endpoint given, S3Store reads AWS_ENDPOINT_URL_S3, then
        # AWS_ENDPOINT_URL (the service's own variable first, as AWS's tools do).
        store = S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url)
    else:
        raise AssertionError(f"check_store_url passed {url!r}")
    if retry:
        from lsbd.store.retry import RetryingStore

        store = RetryingStore(store, retry_within=retry_within)
    return seal_store(store, secret) if seal else store


def seal_store(store: Store, secret) -> Store:
    """`store` (as open_store(seal=False) gave it) with the wrapper that seals
    the segments and checkpoints of compressed or encrypted volumes."""
    from lsbd.crypto.store import SealingStore, volume_resolver

    return SealingStore(store, volume_resolver(store, secret))
