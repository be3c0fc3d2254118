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
"""

from __future__ import annotations

import functools
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
    "attn_implementation",
    "cache_from_call",
    "cache_kwargs",
    "check_transformers_version",
    "eager_attention",
    "eager_mask",
    "layer_dtypes",
    "output_cache",
    "quantized_layer_history",
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


def rope_parameters(model_or_config) -> tuple[torch.Tensor, float] | None:
    """Inverse frequencies and attention scaling of the model's rotary embedding, or ``None``.

    With a model, the buffers of its rotary module are read (they include any RoPE scaling).
    With a config, they are computed as transformers computes them. ``None`` means the model has
    no rotary embedding we know how to reproduce (re-rotating keys is then refused).
    """
    if isinstance(model_or_config, torch.nn.Module):
        for module in model_or_config.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor) and hasattr(module, "attention_scaling"):
                if getattr(module, "rope_type", "default") == "dynamic":
                    return None  # frequencies change with the sequence length
                return inv_freq.detach().float().cpu().clone(), float(module.attention_scaling)
        return None
    config = model_or_config.get_text_config(decoder=True)
    params = getattr(config, "rope_parameters", None)
    if not params or "rope_theta" not in params:
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        return None
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        return None
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


def quantized_layer_history(layer) -> list[torch.Tensor]:
    """The quantized tensors of a transformers ``QuantizedLayer`` (its private ``_quantized_keys/_values``).

    Used by ``benchmarks/quantized.py`` to count the bits per element of transformers' ``QuantizedCache``.
    """
    return [t for t in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)) if t is not None]
