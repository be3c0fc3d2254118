"""Attention sinks plus a sliding window (StreamingLLM, arXiv 2309.17453).

The first few tokens of a sequence collect a large share of attention whatever they say ("attention
sinks"); a plain sliding window evicts them and perplexity collapses once the window is full.
Keeping ``num_sink_tokens`` of them next to the ``window_length`` newest tokens keeps the model
stable at constant memory. With ``rerotate_keys`` the cached keys sit at contiguous positions (the
paper's position shift), so the distance between a query and any cached key never exceeds the
budget and text can stream far past the model's trained context.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from ...config import check_storage_keywords, text_config
from ...registry import CacheSpec, register_cache, register_preset
from ...validate import check_int
from ..cache import KVPlusCache
from ..layer import EvictingLayer


class SinkLayer(EvictingLayer):
    """Keeps the sinks and the newest tokens: the base's default (recency) rule, no scores needed.

    Takes the :class:`~hf_kvplus.eviction.layer.EvictingLayer` arguments (``layer_idx``, ``context``,
    ``budget``, ``num_sink_tokens``, ``recent_window``, ``rope``, ``store_factory``); :class:`SinkCache`
    builds one per decoder layer.

    Args:
        layer_idx (`int`): index of the decoder layer.
        context (`CacheContext`): padding state shared with the other layers.
        budget (`int`, *optional*): tokens kept between forwards; ``None`` keeps all.
        num_sink_tokens (`int`, defaults to 0): first real tokens never evicted.
        recent_window (`int`, defaults to 0): newest tokens never evicted.
        rope (`tuple[torch.Tensor, float]`, *optional*): ``(inv_freq, attention_scaling)`` to re-rotate keys.
        store_factory (`Callable[[], KVStore]`, defaults to `DenseStore`): the storage format.

    Example:

    ```python
    >>> cache = hf_kvplus.SinkCache(model.config, budget=256, num_sink_tokens=4)
    >>> isinstance(cache.layers[0], hf_kvplus.SinkLayer)
    True
    ```"""


class SinkCache(KVPlusCache):
    """StreamingLLM cache: ``num_sink_tokens`` first tokens plus a window of the newest ones.

    Args:
        config (`PreTrainedConfig`): the model's config (a decoder with full attention layers).
        budget (`int`, *optional*): tokens kept per layer, sinks included. Give ``budget`` or
            ``window_length``, not both.
        window_length (`int`, *optional*): newest tokens kept besides the sinks.
        num_sink_tokens (`int`, *optional*, defaults to 4): first tokens never evicted; ``0`` makes a
            plain sliding window.
        rerotate_keys (`bool`, *optional*, defaults to `True`): re-rotate cached keys to contiguous
            positions (needs RoPE parameters; see ``rope``).
        rope (`tuple[torch.Tensor, float]`, *optional*): ``(inv_freq, attention_scaling)`` of the model's
            rotary embedding; computed from ``config`` when omitted. ``make_cache`` reads them from the model.
        **storage: how kept tokens are stored (see :func:`hf_kvplus.storage.base.make_store_factory`);
            full precision by default.

    Example:

    ```python
    >>> from hf_kvplus import SinkCache, attach
    >>> attach(model)  # lets the cache see padding of batched prompts
    >>> cache = SinkCache(model.config, budget=256, num_sink_tokens=4)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=500)
    >>> cache.max_held  # never more than 256 tokens per layer between steps
    256
    ```
    """

    layer_class = SinkLayer

    def __init__(
        self,
        config: PreTrainedConfig,
        budget: int | None = None,
        window_length: int | None = None,
        num_sink_tokens: int = 4,
        rerotate_keys: bool = True,
        rope=None,
        **storage,
    ):
        text_config(config)  # a clear error before anything reads the config
        check_storage_keywords(
            "SinkCache", storage, ["budget", "window_length", "num_sink_tokens", "rerotate_keys", "rope"]
        )
        num_sink_tokens = check_int("num_sink_tokens", num_sink_tokens, minimum=0)
        if (budget is None) == (window_length is None):
            raise ValueError(
                f"SinkCache needs exactly one of budget or window_length, got budget={budget!r}, "
                f"window_length={window_length!r}"
            )
        if budget is None:
            window_length = check_int("window_length", window_length)
            budget = num_sink_tokens + window_length
        budget = check_int("budget", budget)
        if budget <= num_sink_tokens:
            raise ValueError(
                f"budget ({budget}) must be larger than num_sink_tokens ({num_sink_tokens}) to leave room for a window"
            )
        if not isinstance(rerotate_keys, bool):
            raise ValueError(f"rerotate_keys must be True or False, got {rerotate_keys!r}")
        if rerotate_keys and rope is None:
            from ..._compat import rope_parameters

            rope = rope_parameters(config)
            if rope is None:
                raise ValueError(
                    "rerotate_keys=True needs to reproduce the model's rotary embedding exactly, and cannot for this "
                    "model: no rotary module, frequencies that change with the sequence length (dynamic, longrope), "
                    "or a rotation neither channel layout (half-split, interleaved pairs) reproduces (multimodal "
                    "sections); pass rerotate_keys=False"
                )
        self.num_sink_tokens = num_sink_tokens
        self.window_length = budget - num_sink_tokens
        self.rerotate_keys = rerotate_keys
        super().__init__(
            config,
            budget=budget,
            num_sink_tokens=num_sink_tokens,
            rope=rope if rerotate_keys else None,
            **storage,
        )


register_cache(
    CacheSpec(
        name="sink",
        factory=SinkCache,
        description="attention sinks + sliding window (StreamingLLM)",
        paper="arXiv:2309.17453",
    )
)
register_preset("window", "sink", num_sink_tokens=0, rerotate_keys=False)
