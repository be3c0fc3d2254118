"""How tokens are held: full-precision rows, fixed decoding slots, packed codes, shared prefix windows.

Imports nothing of the caches above it (only ``quant/`` and leaf helpers), so any eviction policy can
use any storage: ``make_cache("h2o", model, budget=256, nbits=4)``.
"""

from .base import DenseStore, KVStore, gather_tokens
from .factory import STORAGE_KEYWORDS, make_store_factory, quantized_store_factory
from .packed import QuantizedStore
from .ring import RingStore
from .split import SplitKV

__all__ = ["STORAGE_KEYWORDS", "DenseStore", "KVStore", "QuantizedStore", "RingStore", "SplitKV", "gather_tokens",
           "make_store_factory", "quantized_store_factory"]
