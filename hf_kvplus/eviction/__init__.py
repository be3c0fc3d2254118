"""The budgeted layer (what to keep, padding, deferred crop, RoPE shift) and the cache built from it.

A policy is a small layer class in :mod:`hf_kvplus.eviction.scorers`; how the kept tokens are held is
a store from :mod:`hf_kvplus.storage`. The two compose: ``make_cache("h2o", model, budget=256, nbits=4)``.
"""

from .cache import KVPlusCache
from .context import CacheContext
from .layer import EvictingLayer

__all__ = ["CacheContext", "EvictingLayer", "KVPlusCache"]
