"""Key norm (arXiv 2406.11430): keys with a low L2 norm tend to receive high attention; keep those.

No attention is needed: each token's score is computed once, from its key, when it arrives, so this
scorer runs with any attention implementation and costs almost nothing per step.
"""

from __future__ import annotations

from ...registry import CacheSpec, register_cache
from ..layer import EvictingLayer
from .h2o import ScoredCache


class KeyNormLayer(EvictingLayer):
    """Score = minus the L2 norm of each token's key (``token_state["key_norm"]``, set on arrival)."""

    def initial_state(self, key_states, value_states):
        return {"neg_key_norm": -key_states.float().norm(dim=-1)}  # [batch, kv_heads, new]

    def score(self):
        return self.token_state["neg_key_norm"]

    def slot_score(self, slots):  # the state is minus a norm: a larger magnitude is a lower score
        return self.slot_mean(slots, slots.state["neg_key_norm"]), -1


class KeyNormCache(ScoredCache):
    """Key-norm cache: ``budget`` tokens per KV head, the window of newest ones plus the lowest key norms.

    Args:
        config (`PreTrainedConfig`): the model's config.
        budget (`int`): tokens kept per layer and KV head.
        heavy_ratio (`float`, *optional*, defaults to 0.5): share of the budget chosen by key norm.
        **kwargs: ``recent_window``, ``num_sink_tokens``, ``per_head`` and storage keywords
            (see :class:`ScoredCache`).

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("keynorm", model, budget=256)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=200)
    ```
    """

    layer_class = KeyNormLayer


register_cache(
    CacheSpec(
        name="keynorm",
        factory=KeyNormCache,
        description="keep the keys with the lowest L2 norm (no attention needed)",
        paper="arXiv:2406.11430",
    )
)
