"""How caches learn what they cannot see from ``Cache.update``: padding and attention scores.

Two public extension points, nothing patched:

* a forward pre-hook on the user's model instance (``torch.nn.Module.register_forward_pre_hook``)
  hands each hf_kvplus cache the 2-D attention mask of the call, so evicting caches know which
  columns are left padding (and, to caches with ``observes_input_ids = True``, the call's token ids);
* an attention implementation registered as ``"kvplus"`` through transformers'
  ``AttentionInterface`` (with the SDPA mask builder under the same name in
  ``AttentionMaskInterface``). It returns exactly what ``"sdpa"`` returns and, for the cache layers
  that asked during their ``update``, also computes the attention mass each cached key received.

:func:`attach` installs both on one model; ``make_cache(name, model)`` calls it for you.
"""

from __future__ import annotations

import inspect
import math
import threading

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel

from ._compat import attn_implementation, cache_from_call, sdpa_attention, sdpa_mask

ATTN_IMPLEMENTATION = "kvplus"
_HOOK_ATTR = "_hf_kvplus_input_hook"
# Largest [batch, q_heads, q_block, keys] block of probabilities materialised at once.
_MAX_BLOCK_ELEMENTS = 1 << 24

_handoff = threading.local()


def request_attention(layer_idx: int, layer) -> None:
    """Called by a cache layer inside ``update``: "give me the attention this layer computes"."""
    pending = getattr(_handoff, "pending", None)
    if pending is None:
        pending = _handoff.pending = {}
    pending[layer_idx] = layer


def _take_request(layer_idx: int | None):
    pending = getattr(_handoff, "pending", None)
    if not pending or layer_idx is None:
        return None
    return pending.pop(layer_idx, None)


def attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    reduction: str,
    window: int | None = None,
) -> torch.Tensor:
    """Attention probabilities each key receives, averaged over the query heads of its KV group.

    Args:
        query (`torch.Tensor`): ``[batch, q_heads, q_len, head_dim]``.
        key (`torch.Tensor`): ``[batch, kv_heads, kv_len, head_dim]`` (not repeated for GQA).
        attention_mask (`torch.Tensor`, *optional*): boolean (True = attend) or additive float mask
            broadcastable to ``[batch, 1, q_len, kv_len]``; ``None`` means causal, queries last.
        scaling (`float`, *optional*): softmax scale, ``1/sqrt(head_dim)`` by default.
        reduction (`str`): ``"sum"`` over queries (H2O), ``"last"`` query only (TOVA), or ``"rows"``
            (every query kept).
        window (`int`, *optional*): only the last ``window`` queries count (an observation window,
            SnapKV); ``None`` counts them all.

    Returns:
        `torch.Tensor` (float32): ``[batch, kv_heads, kv_len]`` for ``"sum"``/``"last"``,
        ``[batch, kv_heads, q_len, kv_len]`` for ``"rows"``. Queries are processed in blocks, so
        at most one block of probabilities exists at a time.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    start_q = q_len - 1 if reduction == "last" else 0 if window is None else max(0, q_len - window)
    block = max(1, _MAX_BLOCK_ELEMENTS // max(1, batch * q_heads * kv_len))
    keys_t = key.float().transpose(-1, -2)  # [b, kv_heads, d, kv_len] (a view: no copy)
    q_grouped = query.float().reshape(batch, kv_heads, groups, q_len, head_dim)
    rows = []
    total = 0.0
    for start in range(start_q, q_len, block):
        stop = min(q_len, start + block)
        q_block = q_grouped[:, :, :, start:stop].reshape(batch, kv_heads, groups * (stop - start), head_dim)
        logits = (q_block @ keys_t).view(batch, kv_heads, groups, stop - start, kv_len) * scale
        if attention_mask is None:
            if start < q_len - 1:  # some query of the block precedes some key: apply causality
                q_idx = torch.arange(start, stop, device=query.device) + (kv_len - q_len)
                allowed = torch.arange(kv_len, device=query.device)[None, :] <= q_idx[:, None]
                logits = logits.masked_fill(~allowed, float("-inf"))
        else:
            mask = attention_mask[:, :, start:stop] if attention_mask.shape[2] > 1 else attention_mask
            mask = mask.unsqueeze(2)  # [b, 1, 1, blk, kv_len]
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, float("-inf"))
            else:
                logits = logits + mask.float()
        probs = torch.softmax(logits, dim=-1)  # [b, kvh, g, blk, kv_len]
        if attention_mask is not None:
            probs = probs.nan_to_num_(0.0)  # fully masked rows (padding queries) receive nothing
        if reduction == "rows":
            rows.append(probs.mean(dim=2))  # [b, kvh, blk, kv_len]
        else:
            total = total + probs.sum(dim=(2, 3)) / groups
    if reduction == "rows":
        return torch.cat(rows, dim=2)
    return total if isinstance(total, torch.Tensor) else query.new_zeros(batch, kv_heads, kv_len, dtype=torch.float32)


def kvplus_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that also reports attention mass to the cache layer that requested it."""
    output, weights = sdpa_attention(module, query, key, value, attention_mask, **kwargs)
    layer = _take_request(getattr(module, "layer_idx", None))
    if layer is not None:
        reduction = layer.requested_reduction()
        window = None if reduction == "rows" else layer.attention_window()
        with torch.no_grad():
            mass = attention_mass(query, key, attention_mask, kwargs.get("scaling"), reduction, window)
        layer.observe_attention(mass, reduction)
    return output, weights


_registered = False


def register_attention() -> str:
    """Register the ``"kvplus"`` attention and mask functions (idempotent). Returns the name."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_IMPLEMENTATION, kvplus_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION


def _bound_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return kwargs
    signature = getattr(module, "_hf_kvplus_signature", None)
    if signature is None:
        signature = inspect.signature(module.forward)
        module._hf_kvplus_signature = signature
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return kwargs
    return dict(bound.arguments)


def _observe_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    inputs = _bound_inputs(module, args, kwargs)
    cache = cache_from_call(inputs)
    if cache is None or not hasattr(cache, "observe_inputs"):
        return None
    tokens = inputs.get("input_ids")
    if tokens is None:
        tokens = inputs.get("inputs_embeds")
    if tokens is not None:
        if getattr(cache, "observes_input_ids", False):  # caches that key what they hold by token id (prefix)
            cache.observe_inputs(inputs.get("attention_mask"), tokens.shape[1], input_ids=inputs.get("input_ids"))
        else:
            cache.observe_inputs(inputs.get("attention_mask"), tokens.shape[1])
    return None


def attach(model: PreTrainedModel, attention_scores: bool = False) -> PreTrainedModel:
    """Prepare ``model`` for hf_kvplus caches (idempotent; returns the model).

    Args:
        model (`PreTrainedModel`): the model the caches will run with.
        attention_scores (`bool`, *optional*, defaults to `False`): also switch the model to the
            ``"kvplus"`` attention implementation, needed by caches that score keys by the
            attention they receive (H2O, TOVA). Its outputs are identical to ``"sdpa"``.

    Example:

    ```python
    >>> import hf_kvplus
    >>> hf_kvplus.attach(model, attention_scores=True)
    >>> cache = hf_kvplus.HeavyHitterCache(model.config, budget=256)
    ```
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach() expects a transformers model (torch.nn.Module), got {type(model).__name__}")
    register_attention()
    if getattr(model, _HOOK_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_observe_inputs, with_kwargs=True)
        setattr(model, _HOOK_ATTR, handle)
    if attention_scores and attn_implementation(model) != ATTN_IMPLEMENTATION:
        current = attn_implementation(model)
        if current not in (None, "sdpa", "eager"):
            raise ValueError(
                f"attention scores need the 'kvplus' attention (SDPA-based); the model uses {current!r}. "
                "Load the model with attn_implementation='sdpa' (or 'eager') first."
            )
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def detach(model: PreTrainedModel) -> None:
    """Remove what :func:`attach` installed and return the model to ``"sdpa"`` attention.

    Args:
        model (`PreTrainedModel`): a model passed to :func:`attach` (or to ``make_cache``) before;
            a model never attached is left as it is.

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("h2o", model, budget=256)  # attaches, switches to "kvplus" attention
    >>> hf_kvplus.detach(model)  # hook removed, attention back to "sdpa"
    ```"""
    handle = getattr(model, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(model, _HOOK_ATTR, None)
    if attn_implementation(model) == ATTN_IMPLEMENTATION:
        model.set_attn_implementation("sdpa")
