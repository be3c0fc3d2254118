"""Cache strategies: one file per strategy, all built on :mod:`hf_kvplus.caches.base` (prefix sharing: :mod:`hf_kvplus.prefix`)."""

from .base import CacheContext, EvictingLayer, KVPlusCache
from .registry import CacheSpec, get_spec, list_caches, list_presets, make_cache, register_cache, register_preset
from .quantized import QuantizedKVCache
from .quantized_store import QuantizedStore
from .sink import SinkCache, SinkLayer
from .heavy_hitter import HeavyHitterCache, HeavyHitterLayer, ScoredCache
from .tova import TovaCache, TovaLayer
from .key_norm import KeyNormCache, KeyNormLayer
from .snapkv import SnapKVCache, SnapKVLayer
from .store import DenseStore, KVStore, make_store_factory

__all__ = [
    "CacheContext",
    "CacheSpec",
    "DenseStore",
    "EvictingLayer",
    "HeavyHitterCache",
    "HeavyHitterLayer",
    "KeyNormCache",
    "KeyNormLayer",
    "KVPlusCache",
    "KVStore",
    "QuantizedKVCache",
    "QuantizedStore",
    "ScoredCache",
    "SinkCache",
    "SnapKVCache",
    "SnapKVLayer",
    "SinkLayer",
    "TovaCache",
    "TovaLayer",
    "get_spec",
    "list_caches",
    "list_presets",
    "make_cache",
    "make_store_factory",
    "register_cache",
    "register_preset",
]
