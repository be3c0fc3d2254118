"""TOVA (arXiv 2401.06104): keep the tokens the current query attends to most.

Unlike H2O, nothing accumulates: after each forward, tokens are ranked by the attention of that
forward's last query only, and the lowest is dropped. The paper averages over the heads of a layer
(``per_head=False``, the default here) and keeps no separate recent window.
"""

from __future__ import annotations

import torch

from ...registry import CacheSpec, register_cache
from ..layer import EvictingLayer
from .h2o import ScoredCache


class TovaLayer(EvictingLayer):
    """Score = the attention of the latest query (``token_state["last"]``, replaced every forward)."""

    needs_attention = True

    def attention_reduction(self) -> str:
        return "last"

    def initial_state(self, key_states, value_states):
        shape = (*key_states.shape[:2], key_states.shape[-2])  # [batch, kv_heads, new]
        return {"last": key_states.new_zeros(shape, dtype=torch.float32)}

    def on_attention(self, mass: torch.Tensor) -> None:
        self.token_state["last"] = mass  # [batch, kv_heads, kept]

    def score(self) -> torch.Tensor:
        return self.token_state["last"]

    # slot storage: the latest query's attention, written over every slot
    def arrival_state(self, key_states, value_states):
        return {}

    slot_stepped = ("last",)

    def slot_attention(self, slots, probs):  # probs: [batch * kv_heads, groups, slots]
        torch.baddbmm(slots.rows3["last"], slots.ones(probs.shape[1]), probs, beta=0.0, alpha=1.0 / probs.shape[1],
                      out=slots.spare_rows3["last"])  # the previous step's attention stays intact (see slot_stepped)
        slots.advance("last")

    def slot_score(self, slots):
        return self.slot_mean(slots, slots.state["last"]), 1


class TovaCache(ScoredCache):
    """TOVA cache: ``budget`` tokens chosen by the current query's attention.

    Args:
        config (`PreTrainedConfig`): the model's config.
        budget (`int`): tokens kept per layer.
        heavy_ratio (`float`, *optional*, defaults to 1.0): share chosen by attention (1.0: no window).
        per_head (`bool`, *optional*, defaults to `False`): the paper ranks tokens by the mean over heads.
        **kwargs: ``recent_window``, ``num_sink_tokens`` and storage keywords (see :class:`ScoredCache`).

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("tova", model, budget=256)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=200)
    ```
    """

    layer_class = TovaLayer
    default_heavy_ratio = 1.0

    def __init__(self, config, budget: int, per_head: bool = False, **kwargs):
        super().__init__(config, budget, per_head=per_head, **kwargs)


register_cache(
    CacheSpec(
        name="tova",
        factory=TovaCache,
        description="token omission via attention: the current query's attention decides (TOVA)",
        paper="arXiv:2401.06104",
    )
)
