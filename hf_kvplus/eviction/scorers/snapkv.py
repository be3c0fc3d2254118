"""SnapKV (arXiv 2404.14469): the last queries of the prompt already know which keys will matter.

At prefill, tokens are ranked by the attention they receive from an observation window (the last
``window`` queries of the forward), smoothed over neighbouring tokens by average pooling so that
kept tokens come with their context. During decoding the same score continues as a moving sum with
a horizon of ``window`` queries: each forward's attention is added after the old score decayed by
``(1 - 1/window)`` per query, so the ranking always reflects about the last ``window`` queries.
"""

from __future__ import annotations

import torch

from ...registry import CacheSpec, register_cache
from ..layer import EvictingLayer, _positive_int
from .h2o import ScoredCache


class SnapKVLayer(EvictingLayer):
    """Score = pooled attention from about the last ``window`` queries (``token_state["snap"]``)."""

    needs_attention = True

    def __init__(self, *args, window: int = 32, kernel_size: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.window, self.kernel_size, self._new = window, kernel_size, 0

    def attention_window(self) -> int:
        return self.window

    def initial_state(self, key_states, value_states):
        self._new = key_states.shape[-2]  # queries of this forward
        shape = (*key_states.shape[:2], key_states.shape[-2])  # [batch, kv_heads, new]
        return {"snap": key_states.new_zeros(shape, dtype=torch.float32)}

    def on_attention(self, mass: torch.Tensor) -> None:
        batch, heads, kept = mass.shape
        pooled = torch.nn.functional.avg_pool1d(
            mass.view(batch * heads, 1, kept), self.kernel_size, stride=1, padding=self.kernel_size // 2,
            count_include_pad=False,
        ).view(batch, heads, kept)
        decay = (1.0 - 1.0 / self.window) ** self._new
        self.token_state["snap"] = self.token_state["snap"] * decay + pooled

    def score(self) -> torch.Tensor:
        return self.token_state["snap"]


class SnapKVCache(ScoredCache):
    """SnapKV cache: the window of newest tokens plus the tokens the latest queries attend to.

    Args:
        config (`PreTrainedConfig`): the model's config.
        budget (`int`): tokens kept per layer and KV head.
        window (`int`, *optional*, defaults to 32): queries in the observation window.
        kernel_size (`int`, *optional*, defaults to 5): width of the average pooling over tokens (odd).
        recent_window (`int`, *optional*): newest tokens always kept; defaults to ``window`` (the
            observation window itself is kept, as in the paper).
        **kwargs: ``num_sink_tokens``, ``per_head`` and storage keywords (see :class:`ScoredCache`).

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("snapkv", model, budget=512)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=200)
    ```
    """

    layer_class = SnapKVLayer
    layer_options = ("window", "kernel_size")

    def __init__(self, config, budget: int, window: int = 32, kernel_size: int = 5, recent_window=None, **kwargs):
        window = _positive_int("window", window)
        kernel_size = _positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the pooling is centred on each token), got {kernel_size}")
        if recent_window is None and "heavy_ratio" not in kwargs:
            recent_window = min(window, budget) if isinstance(budget, int) else window
        super().__init__(config, budget, window=window, kernel_size=kernel_size, recent_window=recent_window, **kwargs)


register_cache(
    CacheSpec(
        name="snapkv",
        factory=SnapKVCache,
        description="observation-window attention, pooled over neighbours (SnapKV)",
        paper="arXiv:2404.14469",
        evicting=True,
        attention_scores=True,
    )
)
