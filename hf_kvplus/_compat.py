"""The one place where hf_kvplus touches what differs between transformers versions, or is private.

Everything else in the package uses the public API (``Cache``, ``CacheLayerMixin``,
``AttentionInterface``, ``AttentionMaskInterface``, ``PreTrainedModel``) and the helpers below.
Checked against transformers 5.20.0 and 5.24.0 (the ends of ``TESTED_TRANSFORMERS``, run by
``make test-compat``); 5.21-5.23 behave as 5.20 for every name here.

What moved in 5.24 (and where transformers keeps it):

* the cache keyword of model forwards, decoder layers, attention modules, mask builders and
  ``generate`` is ``cache``; ``past_key_values`` is a deprecated alias (``utils/deprecation.py``,
  ``deprecate_kwarg``: forwards until 5.40, ``generate`` until 6.0) -> :data:`CACHE_KEYWORD`,
  :func:`cache_kwargs`, :func:`cache_from_call`;
* model outputs carry ``.cache`` (``.past_key_values`` warns, ``utils/generic.py``) -> :func:`output_cache`;
* models call ``cache.update(key, value, layer_idx, kwargs=...)`` (``models/*/modeling_*.py``): our
  ``update`` methods take ``*args, **kwargs`` on every version;
* ``CacheLayerMixin`` no longer sets ``layer.dtype``; keys and values carry their own dtypes
  (``cache_utils.py``) -> :func:`layer_dtypes`;
* ``sdpa_attention_forward`` lost its paged ``cache`` parameter (``integrations/sdpa_attention.py``)
  -> :func:`sdpa_attention` passes keywords only;
* assisted decoding checks ``outputs.cache.is_croppable`` after its first forward, and
  ``Cache.is_croppable`` is ``all(layer.is_croppable ...)`` (``generation/utils.py``,
  ``cache_utils.py``) -> our layers answer ``is_croppable`` themselves (see ``EvictingLayer``).

One private PyTorch op (checked on torch 2.13, which every venv here runs): SDPA's CPU kernel
``aten._scaled_dot_product_flash_attention_for_cpu`` returns the log-sum-exp beside the output, which
the split attention of a shared prefix merges by -> :func:`attention_with_lse`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import warnings

import torch
import transformers
from packaging.version import Version

# SDPA as transformers calls it (GQA handling, causal-skip rules): our attention function delegates to it
# for calls that need no attention mass, so those outputs are identical to `attn_implementation="sdpa"`.
from transformers.integrations.sdpa_attention import sdpa_attention_forward as _sdpa_attention_forward

# The mask builders registered for "sdpa" (boolean) and "eager" (additive); we register the same builders for
# the scoring attention of each (`attention.py`, `attention_eager.py`).
from transformers.masking_utils import eager_mask, sdpa_mask

__all__ = [
    "CACHE_KEYWORD",
    "TESTED_TRANSFORMERS",
    "attention_with_lse",
    "attn_implementation",
    "cache_from_call",
    "cache_kwargs",
    "check_transformers_version",
    "eager_attention",
    "eager_mask",
    "layer_dtypes",
    "output_cache",
    "quantized_layer_history",
    "rope_switch",
    "rope_parameters",
    "sdpa_attention",
    "sdpa_mask",
    "set_attn_implementation",
    "transformers_version",
]

# Oldest release tested and the first release not tested (setup.cfg's `install_requires` says the same;
# a test checks that they agree, and `make test-compat` runs the suite on both ends).
TESTED_TRANSFORMERS = ("5.20.0", "5.25")

_INSTALLED = Version(transformers.__version__)
_RENAMED_IN = Version("5.24.0.dev0")  # first release whose forwards and generate take `cache=`

#: The cache keyword the installed transformers documents for ``generate`` and model forwards.
CACHE_KEYWORD = "cache" if _INSTALLED >= _RENAMED_IN else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")


def transformers_version() -> str:
    return transformers.__version__


def check_transformers_version(version: str | None = None) -> bool:
    """Warn (``UserWarning``, once per process) when transformers is outside the tested range.

    Args:
        version (`str`, *optional*): the version to check; the installed one by default.

    Returns:
        `bool`: whether the version lies in ``TESTED_TRANSFORMERS`` (``>=oldest, <next``).
    """
    installed = Version(version or transformers.__version__)
    oldest, first_untested = (Version(v) for v in TESTED_TRANSFORMERS)
    inside = oldest <= installed < first_untested
    if not inside:
        warnings.warn(
            f"hf_kvplus was tested with transformers >={TESTED_TRANSFORMERS[0]},<{TESTED_TRANSFORMERS[1]}; "
            f"transformers {installed} is installed. Caches may fail or misbehave: install a tested version "
            f"(pip install 'transformers>={TESTED_TRANSFORMERS[0]},<{TESTED_TRANSFORMERS[1]}').",
            UserWarning,
            stacklevel=3,
        )
    return inside


def cache_kwargs(cache, model=None) -> dict:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)`` under the installed transformers.

    Args:
        cache (`transformers.Cache` or `None`): the cache to pass.
        model (`torch.nn.Module`, *optional*): for a forward, the model called; a model whose ``forward``
            names only one of the two keywords (remote code, older classes) gets that one.
    """
    if model is not None:
        names = _forward_parameters(type(model))
        if CACHE_KEYWORD not in names:
            for name in _CACHE_NAMES:
                if name in names:
                    return {name: cache}
    return {CACHE_KEYWORD: cache}


@functools.cache
def _forward_parameters(model_class: type) -> frozenset:
    try:
        return frozenset(inspect.signature(model_class.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_from_call(inputs: dict):
    """The cache a forward was called with, under either keyword (``None`` when there is none)."""
    for name in _CACHE_NAMES:
        cache = inputs.get(name)
        if cache is not None:
            return cache
    return None


def output_cache(outputs):
    """The cache held by a model or ``generate`` output (``.cache`` from 5.24, ``.past_key_values`` before)."""
    for name in _CACHE_NAMES:
        if name in outputs.keys():
            return outputs[name]
    return None


def layer_dtypes(layer) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``(key dtype, value dtype)`` of a transformers cache layer; ``(None, None)`` before its first update.

    5.24 dropped ``layer.dtype``; the tensors' own dtypes are read instead (identical on 5.20-5.23).
    """
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
        return keys.dtype, values.dtype
    dtype = getattr(layer, "dtype", None)
    return dtype, dtype


def attn_implementation(model) -> str | None:
    """The attention implementation a model runs with (its config's private ``_attn_implementation``, 5.20-5.24)."""
    return getattr(model.config, "_attn_implementation", None)


def set_attn_implementation(model, name: str) -> None:
    """Point ``model`` (and its sub-configs) at attention implementation ``name``, already registered and checked.

    ``PreTrainedModel.set_attn_implementation`` validates and walks every submodule on each call; hooks that switch
    for one forward and back (:mod:`hf_kvplus.hooks`) set the config's ``_attn_implementation`` (a private property
    whose setter recurses into sub-configs, 5.20-5.24) directly, which is what attention modules read per call.
    """
    model.config._attn_implementation = name


@functools.cache
def _fallback_eager():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def eager_attention(module):
    """The eager attention function of ``module``'s model: the module-level ``eager_attention_forward`` of its
    ``modeling_*.py`` (models differ: soft-capping, attention sinks), which attention modules fall back to when
    the implementation is ``"eager"`` (5.20-5.24); Llama's when the model's file defines none."""
    forward = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return forward if callable(forward) else _fallback_eager()


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention: ``(output [batch, q, q_heads, head_dim], None)``.

    Everything after ``attention_mask`` goes by keyword: the positional parameters after it differ between
    5.20-5.23 (``..., is_causal, cache=None``) and 5.24 (``..., is_causal, position_bias``).
    """
    return _sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def rope_parameters(model_or_config) -> tuple[torch.Tensor, float, str] | None:
    """Inverse frequencies, attention scaling and channel layout of the model's rotary embedding, or ``None``.

    The rotary module (a module with ``inv_freq`` and ``attention_scaling``: the model's own, or built from the
    config by the class its ``modeling_*.py`` defines) gives the frequencies, RoPE scaling included. The layout
    (:data:`hf_kvplus.rope.LAYOUTS`) is the one whose re-rotation reproduces the model's own rotation
    (``apply_rotary_pos_emb`` of its ``modeling_*.py``, 5.20-5.24) of random keys moved by a few positions, to
    1e-4. ``None`` means re-rotation cannot be reproduced (and is then refused): no rotary module, frequencies
    that change with the sequence length (``dynamic``, ``longrope``), or a rotation neither layout matches
    (multimodal sections, a layout of its own).
    """
    from .rope import LAYOUTS, shift_keys

    parts = _rotary_parts(model_or_config)
    if parts is None:
        return None
    rotary, apply, head_dim = parts
    kinds = rotary.rope_type.values() if isinstance(rotary.rope_type, dict) else [rotary.rope_type]
    if any(kind in ("dynamic", "longrope") for kind in kinds) or apply is None:
        return None  # frequencies change with the sequence length
    inv_freq = rotary.inv_freq.detach().float().cpu().clone()
    try:
        with torch.no_grad():
            keys = torch.randn(1, 2, 4, head_dim, generator=torch.Generator().manual_seed(0))  # [b, heads, n, d]
            positions = torch.tensor([[1, 5, 11, 23]])
            base, moved = (_model_rotation(rotary, apply, keys, at) for at in (positions, positions + 7))
    except Exception:  # a rotary module or apply function taking other inputs (multimodal sections)
        return None
    for layout in LAYOUTS:
        if base.shape == moved.shape == keys.shape and 2 * inv_freq.shape[-1] <= head_dim:
            shifted = shift_keys(base, torch.tensor(7), inv_freq, layout)
            if torch.allclose(shifted, moved, atol=1e-4, rtol=1e-4):
                return inv_freq, float(rotary.attention_scaling), layout
    return None


def _model_rotation(rotary, apply, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``keys`` rotated at ``positions`` as the model rotates them (``[b, heads, n, d]``)."""
    cos, sin = rotary(keys, positions)  # [b, n, rot]
    rot = cos.shape[-1]
    try:  # functions that split partial rotary themselves (GPT-NeoX, GLM), and full rotary
        return apply(keys, keys, cos, sin)[1]
    except RuntimeError:  # the attention module splits (Phi): [b, heads, n, rot] in, the rest passes through
        return torch.cat([apply(keys[..., :rot], keys[..., :rot], cos, sin)[1], keys[..., rot:]], dim=-1)


def _rotary_parts(model_or_config):
    """``(rotary module, apply_rotary_pos_emb or None, head_dim)`` of a model or config, or ``None``."""
    if isinstance(model_or_config, torch.nn.Module):
        config = model_or_config.config.get_text_config(decoder=True)
        for module in model_or_config.modules():
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "attention_scaling"):
                apply = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
                return module, apply, _head_dim(config)
        return None
    config = model_or_config.get_text_config(decoder=True)
    params = getattr(config, "rope_parameters", None)
    if not params:
        return None
    model_type = getattr(config, "model_type", "")
    try:
        modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None
    for name, value in vars(modeling).items():
        if name.endswith("RotaryEmbedding") and isinstance(value, type) and "Vision" not in name:
            try:
                rotary = value(config=config)
            except Exception:
                continue
            return rotary, getattr(modeling, "apply_rotary_pos_emb", None), _head_dim(config)
    return None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_switch(model) -> int | None:
    """Length past which ``model``'s (or a config's) rotary embedding switches to other frequencies (LongRoPE), or ``None``.

    transformers' ``longrope_frequency_update`` (``modeling_rope_utils.py``, 5.20-5.24) rewrites the rotary
    module's ``inv_freq`` in place from ``long_factor`` once positions pass
    ``rope_parameters["original_max_position_embeddings"]``; Phi-3's ``prepare_inputs_for_generation`` then
    drops the cache so the forward recomputes every key into a new ``DynamicCache``. Read from the rotary
    module's ``rope_type`` (a string, or one per layer type) and its config's ``rope_parameters``.
    """
    if not isinstance(model, torch.nn.Module):  # a config: its rope_parameters
        config = model.get_text_config(decoder=True)
        params = getattr(config, "rope_parameters", None) or {}
        if params.get("rope_type") != "longrope":
            return None
        switch = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        return int(switch or 0)
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        kinds = rope_type if isinstance(rope_type, dict) else {None: rope_type}
        for layer_type, kind in kinds.items():
            if kind != "longrope":
                continue
            config = getattr(module, "config", None) or getattr(model, "config", None)
            params = getattr(config, "rope_parameters", None) or {}
            params = params.get(layer_type, params) if layer_type is not None else params
            switch = params.get("original_max_position_embeddings")
            if switch is None:
                switch = getattr(config, "original_max_position_embeddings", None)
            return int(switch) if switch is not None else 0
    return None


def quantized_layer_history(layer) -> list[torch.Tensor]:
    """The quantized tensors of a transformers ``QuantizedLayer`` (its private ``_quantized_keys/_values``).

    Used by ``benchmarks/quantized.py`` to count the bits per element of transformers' ``QuantizedCache``.
    """
    return [t for t in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)) if t is not None]


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(query, key, value, bias, scale: float):
    """Softmax attention and its log-sum-exp: ``(output [b, h, q, dv], lse [b, h, q] float32)``.

    ``query`` ``[b, h, q, d]``, ``key``/``value`` ``[b, h, k, d]`` (the same heads), ``bias`` ``None`` or an additive
    float mask in the query's dtype broadcastable to ``[b, h, q, k]``. On CPU, SDPA's own kernel (one op, private:
    ``aten._scaled_dot_product_flash_attention_for_cpu``, torch 2.13); elsewhere, or without it, the same math in
    aten ops (logits in the input dtype, softmax in float32). A row that sees no key gets output 0, and an lse of
    0 from the kernel: callers that may mask whole rows fix the lse themselves.
    """
    if _FLASH_CPU is not None and query.device.type == "cpu":
        return _FLASH_CPU(query, key, value, 0.0, False, attn_mask=bias, scale=scale)
    logits = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # [b, h, q, k]
    if bias is not None:
        logits = logits + bias
    lse = torch.logsumexp(logits.float(), dim=-1)  # [b, h, q]
    probs = torch.exp(logits.float() - lse.unsqueeze(-1)).nan_to_num_(0.0)
    return torch.matmul(probs.to(value.dtype), value), lse
