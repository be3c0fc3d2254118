"""How caches learn the attention they cannot see from ``Cache.update`` (padding: :mod:`hf_kvplus.hooks`).

* An attention implementation registered as ``"kvplus"`` through transformers'
  ``AttentionInterface`` (with the SDPA mask builder under the same name in
  ``AttentionMaskInterface``). It returns what ``"sdpa"`` returns (exactly, for calls no cache layer
  asked about; up to float rounding otherwise) and, for the cache layers that asked during their
  ``update``, the attention mass each cached key received, from the same probabilities as the output.
  Keys and values a prefix-shared cache hands out in parts (:class:`~hf_kvplus.storage.split.SplitKV`)
  are attended part by part and merged (:mod:`hf_kvplus.cascade`): the shared prefix is never copied.

:func:`hf_kvplus.attach` (in :mod:`hf_kvplus.hooks`) switches a model to it when a cache needs scores.
"""

from __future__ import annotations

import math
import threading

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from ._compat import sdpa_attention, sdpa_mask
from .cascade import split_attention
from .storage.split import SplitKV, full_tensor

ATTN_IMPLEMENTATION = "kvplus"
# Largest [batch, q_heads, q_block, keys] block of probabilities materialised at once, and most queries per block.
_MAX_BLOCK_ELEMENTS = 1 << 24
_MAX_QUERIES = 512

_handoff = threading.local()


def request_attention(layer_idx: int, layer) -> None:
    """Called by a cache layer inside ``update``: "give me the attention this layer computes"."""
    pending = getattr(_handoff, "pending", None)
    if pending is None:
        pending = _handoff.pending = {}
    pending[layer_idx] = layer


def take_request(layer_idx: int | None):
    """The evicting layer that asked this thread's next attention call of ``layer_idx`` for its attention mass
    (handed over by ``request_attention``), removed from the hand-over; ``None`` when none asked."""
    pending = getattr(_handoff, "pending", None)
    if not pending or layer_idx is None:
        return None
    return pending.pop(layer_idx, None)


def _causal_fill(logits: torch.Tensor, start: int, q_len: int) -> torch.Tensor:
    """Mask keys after each query in place (queries are the last ``q_len`` positions); ``logits``: ``[..., n, kv_len]``."""
    n, kv_len = logits.shape[-2], logits.shape[-1]
    if start + n < q_len or kv_len > start + (kv_len - q_len) + 1:  # some query of the block precedes some key
        q_idx = torch.arange(start, start + n, device=logits.device) + (kv_len - q_len)  # [n]
        after = torch.arange(kv_len, device=logits.device)[None, :] > q_idx[:, None]  # [n, kv_len]
        logits.masked_fill_(after, float("-inf"))
    return logits


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    reduction: str | None,
    window: int | None = None,
    causal: bool = True,
    dropout: float = 0.0,
    head_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Attention output and the attention mass each key received, from one pass over the same probabilities.

    Queries are processed in blocks (at most ``_MAX_QUERIES`` queries, and about ``_MAX_BLOCK_ELEMENTS``
    probabilities at a time), so memory stays bounded at prefill. Logits are computed in the input dtype
    (as eager attention does), the softmax in float32; keys are never copied.

    Args:
        query (`torch.Tensor`): ``[batch, q_heads, q_len, head_dim]``.
        key (`torch.Tensor`): ``[batch, kv_heads, kv_len, head_dim]`` (not repeated for GQA).
        value (`torch.Tensor`, *optional*): ``[batch, kv_heads, kv_len, value_dim]``; ``None``: no output
            (only the queries that count for the mass are processed).
        attention_mask (`torch.Tensor`, *optional*): boolean (True = attend) or additive float mask
            broadcastable to ``[batch, 1, q_len, kv_len]``; ``None`` means causal (queries last) when ``causal``.
        scaling (`float`, *optional*): softmax scale, ``1/sqrt(head_dim)`` by default.
        reduction (`str`, *optional*): ``"sum"`` over queries (H2O), ``"last"`` query only (TOVA), ``"rows"``
            (every query kept), or ``None`` (no mass).
        window (`int`, *optional*): only the last ``window`` queries count for the mass (SnapKV).
        causal (`bool`, defaults to `True`): apply causality when no mask is given.
        dropout (`float`, defaults to 0.0): dropout on the probabilities of the output (not on the mass).
        head_mask (`torch.Tensor`, *optional*): boolean ``[batch, kv_heads, 1, kv_len]``, False on keys a KV
            head does not hold (unused entries of head-wise budgets, AdaKV arXiv:2407.11550), besides the mask.

    Returns:
        ``(output, mass)``: output ``[batch, q_len, q_heads, value_dim]`` in the value dtype (as SDPA
        attention returns it) or ``None``; mass float32 ``[batch, kv_heads, kv_len]`` for ``"sum"``/``"last"``,
        ``[batch, kv_heads, q_len, kv_len]`` for ``"rows"``, or ``None``.

    Raises:
        ValueError: an unknown ``reduction``, or query heads not a multiple of the KV heads.
    """
    if reduction not in (None, "sum", "last", "rows"):
        raise ValueError(f"reduction must be one of None, 'sum', 'last', 'rows', got {reduction!r}")
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    groups = q_heads // kv_heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    counted = q_len - 1 if reduction == "last" else 0 if window is None else max(0, q_len - window)
    block = max(1, min(_MAX_QUERIES, _MAX_BLOCK_ELEMENTS // max(1, batch * q_heads * kv_len)))
    keys_t = key.transpose(-1, -2)  # [b, kv_heads, d, kv_len] (a view)
    q_grouped = query.reshape(batch, kv_heads, groups, q_len, head_dim)  # query heads grouped by KV head (a view)
    output = None
    if value is not None:
        output = query.new_empty(batch, q_len, q_heads, value.shape[-1], dtype=value.dtype)  # [b, q, q_heads, dv]
    rows, total = [], None
    for start in range(0 if value is not None else counted, q_len, block):
        stop = min(q_len, start + block)
        n = stop - start
        q_block = q_grouped[:, :, :, start:stop].reshape(batch, kv_heads, groups * n, head_dim)
        logits = torch.matmul(q_block, keys_t).view(batch, kv_heads, groups, n, kv_len)  # input dtype
        logits.mul_(scale)
        if attention_mask is None:
            if causal:
                _causal_fill(logits, start, q_len)
        else:
            mask = attention_mask[:, :, start:stop] if attention_mask.shape[2] > 1 else attention_mask
            mask = mask.unsqueeze(2)  # [b, 1, 1, n, kv_len]
            if mask.dtype == torch.bool:
                logits.masked_fill_(~mask, float("-inf"))
            else:
                logits = logits + mask.to(logits.dtype)
        if head_mask is not None:
            logits = logits.masked_fill(~head_mask.unsqueeze(2), float("-inf"))  # [b, kv_heads, 1, 1, kv_len]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [b, kv_heads, groups, n, kv_len]
        if attention_mask is not None:  # fully masked rows (padding queries) attend to nothing
            probs = probs.nan_to_num(0.0) if probs.requires_grad else probs.nan_to_num_(0.0)
        if value is not None:
            weights = probs.to(value.dtype) if dropout == 0.0 else torch.nn.functional.dropout(probs, dropout).to(value.dtype)
            out = torch.matmul(weights.view(batch, kv_heads, groups * n, kv_len), value)  # [b, kv_heads, g * n, dv]
            out = out.view(batch, kv_heads, groups, n, -1).permute(0, 3, 1, 2, 4)  # [b, n, kv_heads, groups, dv]
            output[:, start:stop] = out.reshape(batch, n, q_heads, -1)
        if reduction is None or stop <= counted:
            continue
        counting = probs[:, :, :, max(0, counted - start) :]  # the queries that count
        if reduction == "rows":
            rows.append(counting.mean(dim=2))  # [b, kv_heads, n, kv_len]
        else:
            part = counting.sum(dim=(2, 3)) / groups  # [b, kv_heads, kv_len]
            total = part if total is None else total + part
    if reduction == "rows":
        return output, torch.cat(rows, dim=2)
    return output, total


def attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    reduction: str,
    window: int | None = None,
) -> torch.Tensor:
    """Attention probabilities each key receives, averaged over the query heads of its KV group.

    The mass part of :func:`attend` (no output): ``[batch, kv_heads, kv_len]`` float32 for ``"sum"`` and
    ``"last"``, ``[batch, kv_heads, q_len, kv_len]`` for ``"rows"``. Arguments as in :func:`attend`.
    """
    return attend(query, key, None, attention_mask, scaling, reduction, window)[1]


def _decode_in_slots(slots, query, key, value, attention_mask, scale: float):
    """One query over every slot of a :class:`~hf_kvplus.storage.slots.SlotStore`: the output and the probabilities.

    When ``key``/``value`` are the store's buffers (as ``update`` returned them), the store's 3-D views made
    once are used, so a step costs a handful of kernels. Returns the output ``[batch, 1, q_heads, value_dim]``
    (the store's output buffer, overwritten by the layer's next step: the model consumes it first) and the probabilities ``[batch * kv_heads, groups, slots]`` float32 (the query heads of each KV head, in
    slot order).
    """
    batch, q_heads, _, head_dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    rows = batch * kv_heads
    if key is slots.keys and value is slots.values:
        keys_t, values = slots.keys_t3, slots.values3  # [b * kv_heads, head_dim, slots], [b * kv_heads, slots, dv]
    else:  # the model changed them after update: same slots, views made now
        keys_t = key.reshape(rows, capacity, head_dim).transpose(1, 2)
        values = value.reshape(rows, capacity, value.shape[-1])
    q = query.reshape(rows, q_heads // kv_heads, head_dim)  # [b * kv_heads, groups, d]
    if attention_mask is None:
        logits = torch.baddbmm(slots.no_bias, q, keys_t, beta=0.0, alpha=scale)  # [b * kv_heads, groups, slots]
    else:  # a mask of one query: without padding every key is visible, whatever the column order
        mask = attention_mask.reshape(batch, 1, 1, -1)
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
        bias = mask.to(query.dtype).expand(batch, kv_heads, 1, capacity).reshape(rows, 1, capacity)
        logits = torch.baddbmm(bias, q, keys_t, alpha=scale)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [b * kv_heads, groups, slots]
    weights = probs if values.dtype == torch.float32 else probs.to(values.dtype)
    output, output3 = slots.output_buffer(q_heads, values.shape[-1])  # [b, 1, q_heads, dv] and its [b*kvh, g, dv] view
    torch.bmm(weights, values, out=output3)
    return output, probs


# Keywords that change the attention math; calls carrying one run SDPA for the output.
_OTHER_MATH = ("softcap", "s_aux", "sinks", "sliding_window", "position_bias")


def kvplus_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """SDPA-equivalent attention that also reports attention mass to the cache layer that requested it.

    Layers that asked (in their ``update``) get the output and the mass from one pass over the same
    probabilities (:func:`attend`), and the queries first when they define ``observe_queries(query, scaling)``
    (expected attention keeps their statistics); in slot storage a decoding step reads the store's buffers directly.
    Other calls, and calls with arguments this pass does not implement (soft-capping, attention sinks,
    sliding windows, a position bias), run transformers' SDPA attention (the mass, if asked, separately).
    Keys and values given in parts (a shared prefix, then each row's own tokens) are attended by parts
    (:func:`~hf_kvplus.cascade.split_attention`) when no mass is asked and the math is plain.
    """
    layer = take_request(getattr(module, "layer_idx", None))
    plain = all(kwargs.get(name) is None for name in _OTHER_MATH)
    if isinstance(key, SplitKV) and isinstance(value, SplitKV):
        if layer is None and plain and not kwargs.get("dropout"):
            causal = kwargs.get("is_causal")
            causal = getattr(module, "is_causal", True) if causal is None else causal
            output = split_attention(query, key, value, attention_mask, kwargs.get("scaling"), causal)
            if output is not None:
                return output, None
        key, value = full_tensor(key), full_tensor(value)
    if layer is None:
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)
    cut = getattr(layer, "own_mask_length", False) and attention_mask is not None
    if cut and attention_mask.shape[-1] > key.shape[-2]:  # built for the longest layer: the last columns are ours
        attention_mask = attention_mask[..., -key.shape[-2] :]
    scaling = kwargs.get("scaling")
    slots = getattr(layer, "store", None)
    if getattr(slots, "keys_t3", None) is not None:  # a SlotStore: one query over every slot
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        with torch.no_grad():
            output, probs = _decode_in_slots(slots, query, key, value, attention_mask, scale)
        if not plain:
            output = sdpa_attention(module, query, key, value, attention_mask, **kwargs)[0]
        layer.observe_slot_probs(probs)
        return output, None
    head_mask = getattr(layer, "head_mask", None)
    if head_mask is not None and (layer.verifying or not plain):
        names = sorted(name for name in _OTHER_MATH if kwargs.get(name) is not None)
        what = "verifies draft tokens" if layer.verifying else f"passes {names}"
        raise ValueError(
            f"layer {layer.layer_idx} holds head-wise budgets (budget_allocation='adaptive'), which only the plain "
            f"'kvplus' attention masks per head; this forward {what}: use budget_allocation='uniform' for it"
        )
    if layer.verifying and plain:  # drafts verified row by row, over what each step would have kept
        with torch.no_grad():
            return layer.verify_attention(query, key, value, scaling), None
    if layer.verifying:  # a model whose config did not announce its other math (refused when recording began)
        names = sorted(name for name in _OTHER_MATH if kwargs.get(name) is not None)
        raise ValueError(
            f"draft tokens are verified exactly only for plain attention; layer {layer.layer_idx} passes {names}, "
            "which the verification does not implement: decode without an assistant with this cache"
        )
    observe = getattr(layer, "observe_queries", None)  # a scorer that keeps statistics of the queries
    if observe is not None:
        observe(query, scaling)
    reduction = layer.requested_reduction()
    window = None if reduction == "rows" else layer.attention_window()
    if plain:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        dropout = kwargs.get("dropout") or 0.0
        output, mass = attend(query, key, value, attention_mask, scaling, reduction, window, causal, dropout,
                              head_mask)
        layer.observe_attention(mass.detach(), reduction)
        return output, None
    output, weights = sdpa_attention(module, query, key, value, attention_mask, **kwargs)
    with torch.no_grad():
        mass = attention_mass(query, key, attention_mask, scaling, reduction, window)
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
