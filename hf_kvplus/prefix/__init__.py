"""Prefix sharing: a model-free radix tree and pool, their file format, and the cache that reads them."""

from .cache import PrefixSharedCache
from .layer import PrefixLayer
from .pool import PrefixPool
from .store import PrefixStore, prefix_store
from .tree import LRUPolicy

__all__ = ["LRUPolicy", "PrefixLayer", "PrefixPool", "PrefixSharedCache", "PrefixStore", "prefix_store"]
