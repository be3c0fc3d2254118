"""One module per eviction policy; importing this package registers them (in this order)."""
# ruff: noqa: I001  (import order is registration order)

from .sink import SinkCache, SinkLayer
from .h2o import HeavyHitterCache, HeavyHitterLayer, ScoredCache
from .tova import TovaCache, TovaLayer
from .key_norm import KeyNormCache, KeyNormLayer
from .snapkv import SnapKVCache, SnapKVLayer
from .expected import ExpectedAttentionCache, ExpectedAttentionLayer

__all__ = ["ExpectedAttentionCache", "ExpectedAttentionLayer", "HeavyHitterCache", "HeavyHitterLayer", "KeyNormCache", "KeyNormLayer", "ScoredCache", "SinkCache",
           "SinkLayer", "SnapKVCache", "SnapKVLayer", "TovaCache", "TovaLayer"]
