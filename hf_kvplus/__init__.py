"""hf_kvplus: KV cache strategies for Hugging Face transformers, and recipes that measure them.

Every cache is a real ``transformers.Cache`` built from per-layer ``CacheLayerMixin`` objects::

    import hf_kvplus
    cache = hf_kvplus.make_cache("sink", model, budget=256)
    out = model.generate(**inputs, cache=cache, max_new_tokens=256)  # past_key_values=cache before 5.24
    hf_kvplus.cache_nbytes(cache)  # bytes really held
"""

__version__ = "0.1.0"

from ._compat import CACHE_KEYWORD, TESTED_TRANSFORMERS, check_transformers_version

check_transformers_version()  # a UserWarning, once per process, outside the tested transformers range

from .attention import ATTN_IMPLEMENTATION
from .hooks import attach, detach
from .eviction import CacheContext, EvictingLayer, KVPlusCache
from .registry import CacheSpec, get_spec, list_caches, list_presets, make_cache, register_cache, register_preset
from .storage import DenseStore, KVStore, QuantizedStore
from .quantized import QuantizedKVCache  # registration order: quantized, the eviction policies, prefix
from .eviction.scorers import ExpectedAttentionCache, HeavyHitterCache, KeyNormCache, ScoredCache, SinkCache, SinkLayer, SnapKVCache, TovaCache
from .memory import cache_nbytes
from .prefix import LRUPolicy, PrefixSharedCache, PrefixStore, prefix_store  # registers "prefix" after the strategies
from .prefill import prefill

__all__ = [
    "ExpectedAttentionCache",
    "ATTN_IMPLEMENTATION",
    "CACHE_KEYWORD",
    "CacheContext",
    "CacheSpec",
    "DenseStore",
    "EvictingLayer",
    "HeavyHitterCache",
    "KeyNormCache",
    "KVPlusCache",
    "KVStore",
    "LRUPolicy",
    "PrefixSharedCache",
    "PrefixStore",
    "QuantizedKVCache",
    "QuantizedStore",
    "ScoredCache",
    "SinkCache",
    "SinkLayer",
    "SnapKVCache",
    "TESTED_TRANSFORMERS",
    "TovaCache",
    "__version__",
    "attach",
    "cache_nbytes",
    "detach",
    "get_spec",
    "list_caches",
    "list_presets",
    "make_cache",
    "prefix_store",
    "prefill",
    "register_cache",
    "register_preset",
]
