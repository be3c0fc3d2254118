"""The cache: one :class:`~hf_kvplus.eviction.layer.EvictingLayer` per decoder layer, and what concerns them all."""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedConfig

from ..attention_eager import VARIANTS
from ..config import decoder_config, kv_geometry
from ..quant.rotation import check_rotation
from ..storage.factory import STORAGE_KEYWORDS, make_store_factory
from ..storage.ring import RopeAngles
from .context import CacheContext
from .layer import EvictingLayer

#: Attention implementations under which drafts are verified row by row (the hook runs them on "kvplus").
VERIFIABLE = frozenset(VARIANTS) | frozenset(VARIANTS.values())


class KVPlusCache(Cache):
    """A ``transformers.Cache`` of :class:`EvictingLayer` (or subclass) layers sharing one :class:`CacheContext`.

    Subclasses set ``layer_class`` and pass the layer keyword arguments; see ``SinkCache``. Storage
    keywords (``nbits=``, ``store_factory=``...) go to :func:`~hf_kvplus.storage.base.make_store_factory`,
    so every strategy runs over every storage format.

    Args:
        config (`PreTrainedConfig`): the model's config (layers, KV heads and head size are read from it).
        store_factory (`Callable[[], KVStore]`, *optional*): the storage format of every layer.
        nbits (`int`, *optional*): 8, 4 or 2 for packed storage (with ``group_size=``, ``residual_length=``).
        **layer_kwargs: keyword arguments of ``layer_class`` (``budget``, ``num_sink_tokens``, ...).

    Example:

    ```python
    >>> class ValueNormCache(KVPlusCache):
    ...     layer_class = ValueNormLayer
    >>> cache = ValueNormCache(model.config, budget=256, nbits=4)
    ```
    """

    layer_class: type[EvictingLayer] = EvictingLayer

    def __init__(self, config: PreTrainedConfig, store_factory=None, nbits=None, **layer_kwargs):
        num_layers, self.num_kv_heads, self.head_dim = kv_geometry(config)
        self.context = CacheContext()
        storage = {name: layer_kwargs.pop(name) for name in STORAGE_KEYWORDS if name in layer_kwargs}
        check_rotation(storage.get("rotation"), self.head_dim)
        layer_kwargs["store_factory"] = make_store_factory(store_factory=store_factory, nbits=nbits, **storage)
        layers = [self.layer_class(i, self.context, **layer_kwargs) for i in range(num_layers)]
        heads = decoder_config(config).num_attention_heads
        for layer in layers:
            layer.query_groups = max(1, heads // self.num_kv_heads)
        super().__init__(layers=layers)
        #: Whether forwards through this cache need the scoring attention (read by the model hook, see hooks.py).
        self.needs_attention = any(layer.needs_attention for layer in layers)
        #: Whether forwards read a shared prefix in parts through the "kvplus" attention (prefix caches, see hooks.py).
        self.split_attention = any(getattr(layer, "split_attention", False) for layer in layers)
        self.context.last_layer = num_layers - 1
        #: What in the model's attention math draft verification does not implement (``None``: plain attention).
        self.other_attention_math = other_attention_math(config)

    def predict_nbytes(self, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int | None:
        """Bytes :func:`hf_kvplus.cache_nbytes` will count once ``tokens`` tokens went through this (fresh) cache.

        Example:

        ```python
        >>> cache = hf_kvplus.make_cache("sink", model.config, budget=256)
        >>> cache.predict_nbytes(4096, batch=1, dtype=torch.bfloat16)  # the same after 300 tokens or 300,000
        ```
        """
        per_layer = [layer.predict_nbytes(batch, self.num_kv_heads, tokens, self.head_dim, dtype) for layer in self.layers]
        if any(p is None for p in per_layer):
            return None
        tables = {id(layer.rope[0]): layer.rope[0].untyped_storage().nbytes() for layer in self.layers
                  if layer.rope is not None and tokens}
        slots_with_sinks = any(
            layer.uses_slots() and tokens > layer.budget and layer.rope is not None and layer.num_sink_tokens
            for layer in self.layers
        )
        angles = RopeAngles.predict_nbytes(self.head_dim) if slots_with_sinks else 0  # the sinks' shift, shared
        shared: dict = {}  # buffers every layer's store shares (the quantized stores' scratch), counted once
        for layer in self.layers:
            kept = tokens if layer.budget is None else min(tokens, layer.budget)
            for key, nbytes in layer.store_factory().shared_nbytes(batch, self.num_kv_heads, kept, self.head_dim,
                                                                   dtype).items():
                shared[key] = max(shared.get(key, 0), nbytes)
        return sum(per_layer) + sum(tables.values()) + angles + sum(shared.values())

    @property
    def evicts(self) -> bool:
        return any(layer.budget is not None for layer in self.layers)

    @property
    def budget(self) -> int | None:
        return self.layers[0].budget if self.layers else None

    def activate_past_recording(self) -> None:
        """Defer eviction in every layer until ``crop`` (assisted and speculative decoding start with this).

        Drafts are then verified row by row, exactly as plain decoding would run them (:mod:`.verify`), which
        takes the ``"kvplus"`` attention. Raises a ``ValueError`` before anything changes when an evicting layer
        could not be verified exactly: a model whose attention implementation has no ``"kvplus"`` variant (flash,
        flex), a model whose attention math is not plain (soft-capping, a sliding window, learned sinks: see
        :func:`other_attention_math`), a layer whose scores the verification cannot replay
        (``verification_refusal``: expected attention, a decayed H2O mass, head-wise budgets), or a cache never attached to its model (built from a config) for a
        strategy that does not score by attention (sinks, key norm). A left-padded prompt is refused by the
        first forward (:meth:`observe_inputs`), before any layer changes.
        """
        for layer in self.layers:
            if not isinstance(layer, EvictingLayer) or layer.budget is None:
                continue
            reason = layer.verification_refusal()
            if reason is not None:
                raise ValueError(
                    f"{type(self).__name__} verifies draft tokens exactly as plain decoding runs them, but layer "
                    f"{layer.layer_idx} uses {reason}, so assisted and speculative decoding could differ from plain "
                    "decoding. Decode without an assistant with this cache, or use DynamicCache for assisted decoding."
                )
            if self.other_attention_math is not None:
                raise ValueError(
                    f"{type(self).__name__} verifies draft tokens exactly only for plain scaled dot-product "
                    f"attention; this model's attention uses {self.other_attention_math}, which the verification "
                    "does not implement, so assisted and speculative decoding could differ from plain decoding. "
                    "Decode without an assistant with this cache, or use DynamicCache for assisted decoding."
                )
            known = self.context.attention is not None or not layer.needs_attention  # scorers fail loudly unattached
            if known and self.context.attention not in VERIFIABLE:
                raise ValueError(
                    f"{type(self).__name__} verifies draft tokens exactly only through the 'kvplus' attention, which "
                    f"stands in for {sorted(VERIFIABLE)}; the model runs {self.context.attention!r}: load it with "
                    "attn_implementation='sdpa' (or 'eager') and build the cache with make_cache(name, model) for "
                    "assisted or speculative decoding."
                )
        for layer in self.layers:
            layer.activate_past_recording()

    def end_stale_recording(self) -> None:
        """Stop deferring eviction once generation has left assisted decoding.

        Assisted and prompt-lookup decoding activate past recording and call ``crop`` after every forward;
        generate leaves recording on in the cache it returns. A forward starting while the previous one
        was never cropped means nobody will crop any more (for example ``generate`` continuing from that
        cache without an assistant): the pending tokens are committed and eviction resumes after each
        forward, so the budget holds again. Called before each forward (mask sizes, model hook).
        """
        if any(layer.uncommitted for layer in self.layers if isinstance(layer, EvictingLayer)):
            for layer in self.layers:
                layer.end_past_recording()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        self.end_stale_recording()
        return super().get_mask_sizes(query_length, layer_idx)

    def observe_inputs(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Learn each row's left padding from the call's 2-D attention mask (done by the model hook)."""
        self.end_stale_recording()
        self.context.observed = True
        seen = self.get_seq_length()
        if isinstance(attention_mask, dict):  # one mask per attention type: padding shows in the full one
            attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            attention_mask = self._padding_from_4d(attention_mask, seen, query_length)
        if attention_mask is None or attention_mask.dim() != 2:
            return
        context = self.context
        if query_length == 1 and context.mask_length == seen and attention_mask.shape[-1] == seen + 1:
            # A decoding step: generate appends one real column to the mask whose padding was read at prefill.
            # Nothing is read back from the device here (no host sync per step).
            context.mask_length = seen + 1
            return
        mask = attention_mask.to(torch.bool)
        if mask.shape[-1] == query_length and seen > 0:
            if bool(mask.all()):
                return
            history = None
        elif mask.shape[-1] == seen + query_length:
            history = mask
        else:
            return  # transformers will reject or interpret the mask itself
        left_padded = history is not None and bool((history[:, 1:] >= history[:, :-1]).all())
        if not left_padded:
            if self.evicts:
                raise ValueError(
                    f"{type(self).__name__} evicts tokens, so it supports left padding only (padding columns first, "
                    "then real tokens); this attention mask has padding after real tokens. Pad on the left "
                    "(tokenizer.padding_side='left') and pass the full mask."
                )
            return
        padding = (~history).sum(dim=-1)  # [batch]
        recording = [layer for layer in self.layers if isinstance(layer, EvictingLayer) and layer.record_past
                     and layer.budget is not None]
        if recording and bool(padding.any()):
            if not any(layer.uncommitted for layer in recording):  # as before generate turned recording on
                for layer in recording:
                    layer.record_past = False
            raise ValueError(
                f"{type(self).__name__} verifies draft tokens exactly only for unpadded rows; this prompt is "
                f"left-padded by {padding.tolist()} tokens. Pass the row without padding (no attention_mask "
                "zeros) for assisted or speculative decoding, or decode without an assistant."
            )
        context.set_padding(padding)
        context.mask_length = history.shape[-1]

    @staticmethod
    def _padding_from_4d(mask: torch.Tensor, seen: int, query_length: int) -> torch.Tensor | None:
        """The 2-D padding mask behind a 4-D one (``[batch, 1, query, kv]``), which ``generate`` builds itself
        for a compileable cache: when the columns are every position so far (nothing evicted yet), the last
        query, which sees every earlier position, attends exactly the real tokens. ``None`` for a one-token
        step (its padding was read at prefill) or when the columns are not every position."""
        if query_length == 1 or mask.shape[-1] != seen + query_length:
            return None
        last = mask[:, 0, -1]  # [batch, seen + query]: bool (True attends) or additive float (0 attends)
        return last if last.dtype == torch.bool else last == 0

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the newest ``-tokens_to_remove`` tokens in every layer, or in none (``ValueError``)."""
        for layer in self.layers:
            if isinstance(layer, EvictingLayer):
                layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)
        if tokens_to_remove:
            self.context.mask_length = None  # the next mask is read again

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.context.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self.context.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.context.pad_len is not None:
            self.context.set_padding(self.context.pad_len.repeat_interleave(repeats))

    def reset(self) -> None:
        super().reset()
        self.context.reset()

    @property
    def max_held(self) -> int:
        """Most tokens any layer held between forwards since the last reset."""
        return max((layer.max_held for layer in self.layers), default=0)


def other_attention_math(config: PreTrainedConfig) -> str | None:
    """What a model's attention computes beyond plain scaled dot-product attention over a causal mask, from its
    config: logit soft-capping (Gemma 2), a sliding window (Mistral, Gemma, Qwen2 with ``use_sliding_window``), or
    learned attention sinks (gpt-oss). ``None`` for plain attention. Draft verification replays plain attention
    only (:mod:`.verify`), so :meth:`KVPlusCache.activate_past_recording` refuses the others."""
    config = decoder_config(config)
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        return f"logit soft-capping (attn_logit_softcapping={softcap})"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return f"a sliding window (sliding_window={window})"
    if getattr(config, "model_type", None) == "gpt_oss":
        return "learned attention sinks (gpt-oss)"
    return None
