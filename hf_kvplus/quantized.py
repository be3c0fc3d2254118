"""KIVI-style quantized KV cache: every token kept, packed to int8, int4 or int2 (arXiv 2402.02750).

Keys are quantized per channel over groups of tokens (their outliers sit in fixed channels),
values per token over groups of channels, with a full-precision window of the newest tokens; see
:class:`~hf_kvplus.storage.packed.QuantizedStore`. The same storage runs under every
eviction strategy: ``make_cache("sink", model, budget=256, nbits=4)``.
"""

from __future__ import annotations

import warnings

import torch
from transformers import PreTrainedConfig

from ._compat import rope_parameters
from .config import kv_geometry, text_config
from .eviction.cache import KVPlusCache
from .eviction.layer import EvictingLayer
from .quant import check_nbits
from .quant.rotation import check_rotation
from .registry import CacheSpec, register_cache, register_preset
from .storage.factory import quantized_store_factory
from .storage.packed import DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL_LENGTH


class QuantizedLayer(EvictingLayer):
    """A layer that keeps every token: positions are implicit (``0..seen-1``), so a step stores none."""

    implicit_positions = True

    @property
    def pos(self) -> torch.Tensor | None:
        return None if self.store is None else torch.arange(self.seen, device=self.device)

    @pos.setter
    def pos(self, value) -> None:  # the base assigns positions; a layer that never evicts needs no table
        pass

    def predict_nbytes(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int | None:
        """The store's bytes: no positions, no per-token state."""
        return self.store_factory().predict_nbytes(batch, kv_heads, tokens, head_dim, dtype)


class QuantizedKVCache(KVPlusCache):
    """Keeps every token, packed: ``nbits`` per value plus a scale and zero point per group.

    Args:
        config (`PreTrainedConfig`): the model's config.
        nbits (`int`, *optional*, defaults to 4): 8, 4 or 2 bits per key and value element.
        group_size (`int`, *optional*, defaults to 64): tokens per key group and channels per value group.
        residual_length (`int`, *optional*, defaults to 128): newest tokens kept in full precision
            (a multiple of ``group_size``); older ones are quantized ``group_size`` at a time, once.
        scale_dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): dtype of scales and zero points.
        backend (`str`, *optional*, defaults to ``"torch"``): quantization kernels; ``"quanto"`` uses
            optimum-quanto's (same storage, same features; needs ``pip install "hf_kvplus[quanto]"``).
        dequant (`str`, *optional*, defaults to ``"auto"``): how a decoding step restores the packed history:
            ``"eager"`` (a few aten ops), ``"compiled"`` (one pass compiled with ``torch.compile`` on CPU; falls back to
            eager, with one warning, where compilation fails) or ``"auto"`` (compiled on CPU once a layer holds
            4096 packed tokens, where the seconds of compilation pay; eager elsewhere, and on GPUs for now).
        key_bits, value_bits (`int`, *optional*): 8, 4 or 2 bits for keys and for values separately (``nbits`` for
            each not given); keys lose more to quantization than values, so ``key_bits=4, value_bits=2`` (K4V2).
        rotation (`str`, *optional*): ``"hadamard"`` rotates keys per head by an orthonormal Hadamard matrix before
            their per-channel quantization and back after it (QuaRot arXiv:2404.00456, RotateKV
            arXiv:2501.16383): attention scores are unchanged up to quantization error. Needs a power-of-two
            ``head_dim`` (``ValueError`` otherwise, at construction).
        sinks (`int`, *optional*, defaults to 0): the first ``sinks`` tokens of every row kept in full precision
            (attention sinks; KVQuant keeps the first token exact, arXiv:2401.18079).
        pre_rope (`bool`, *optional*, defaults to `False`): quantize keys before RoPE (KVQuant, arXiv:2401.18079):
            each key is rotated back to position 0 (:mod:`hf_kvplus.rope`, the model's own layout) before its
            quantization and to its position when restored, two more ops per layer per decoding step.

    Example:

    ```python
    >>> import hf_kvplus
    >>> cache = hf_kvplus.make_cache("int4", model)  # or QuantizedKVCache(model.config, nbits=4)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=256)
    >>> hf_kvplus.cache_nbytes(cache)  # about 30% of a bf16 DynamicCache at 2k tokens
    ```
    """

    layer_class = QuantizedLayer

    def __init__(
        self,
        config: PreTrainedConfig,
        nbits: int = 4,
        group_size: int = DEFAULT_GROUP_SIZE,
        residual_length: int = DEFAULT_RESIDUAL_LENGTH,
        scale_dtype: torch.dtype = torch.float16,
        backend: str = "torch",
        dequant: str = "auto",
        key_bits: int | None = None,
        value_bits: int | None = None,
        rotation: str | None = None,
        sinks: int = 0,
        pre_rope: bool = False,
    ):
        self.nbits, self.group_size, self.residual_length = check_nbits(nbits), group_size, residual_length
        check_rotation(rotation, kv_geometry(config)[2])
        if not isinstance(pre_rope, bool):
            raise ValueError(f"pre_rope must be True or False, got {pre_rope!r}")
        rope = rope_parameters(config) if pre_rope else None
        if pre_rope and rope is None:
            raise ValueError(
                "pre_rope=True needs the model's rotary embedding reproduced exactly (hf_kvplus._compat.rope_parameters), "
                "which this config does not allow (no RoPE, frequencies that change with length, or another layout)"
            )
        factory = quantized_store_factory(nbits, group_size, residual_length, scale_dtype, backend, scratch=True,
                                          dequant=dequant, key_bits=key_bits, value_bits=value_bits,
                                          rotation=rotation, sinks=sinks, rope=rope)
        context = getattr(text_config(config), "max_position_embeddings", None)
        first = sinks + residual_length + group_size  # tokens held before the first flush
        if isinstance(context, int) and first > context:  # degenerate: nothing is quantized
            held = f"sinks={sinks}, " if sinks else ""
            warnings.warn(
                f"QuantizedKVCache with {held}residual_length={residual_length} and group_size={group_size} quantizes "
                f"nothing within the model's context (max_position_embeddings={context}): the residual flushes at "
                f"{'sinks + ' if sinks else ''}residual_length + group_size tokens, so every token stays in full "
                f"precision, as in DynamicCache. Use {'sinks + ' if sinks else ''}residual_length + group_size <= "
                f"{context}",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(config, store_factory=factory)


register_cache(
    CacheSpec(
        name="quantized",
        factory=QuantizedKVCache,
        description="every token, keys per channel / values per token in packed int8/int4/int2 (KIVI)",
        paper="arXiv:2402.02750",
        # Tiny groups and residual so the conformance prompts (16-44 tokens) are mostly quantized.
        sweep={"nbits": (8, 4, 2)},
    )
)
register_preset("int8", "quantized", nbits=8)
register_preset("int4", "quantized", nbits=4)
register_preset("int2", "quantized", nbits=2)
# 2-bit keys that hold up: rotated keys and four exact sinks, 2.5 bits per history element (issue 17).
register_preset("int2r", "quantized", nbits=2, rotation="hadamard", sinks=4)
register_preset("k4v2", "quantized", key_bits=4, value_bits=2)
register_preset("int2rp", "quantized", nbits=2, rotation="hadamard", sinks=4, pre_rope=True)
