"""Object stores: a local directory or S3, and wrappers around any store."""

from lsbd.store.base import ObjectInfo, Store
from lsbd.store.open import open_store, seal_store

__all__ = ["ObjectInfo", "Store", "open_store", "seal_store"]
