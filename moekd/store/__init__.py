"""The Zarr teacher cache: layout, crash-safe writer, reader and verification. Shared by builder and trainer."""

from moekd.store.reader import CacheExample, CacheReader

__all__ = ["CacheExample", "CacheReader"]
