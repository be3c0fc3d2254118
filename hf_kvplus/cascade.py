"""Attention over a shared prefix and each row's own tokens, merged exactly: cascade (split) attention.

The keys of a prefix-shared cache are one row of prefix, read by every batch row, then each row's own
tokens (:class:`~hf_kvplus.storage.split.SplitKV`). Expanding the prefix to the batch and concatenating
it with the own tokens copies the whole prefix in every layer at every step. Instead (as vLLM's cascade
attention, FlashInfer's shared-prefix batch decoding and SGLang do):

* the prefix is attended once for the whole batch: the batch rows are folded into the query dimension,
  ``[1, kv_heads, batch * groups * q, head_dim]`` against the prefix keys ``[1, kv_heads, P, head_dim]``
  (no expand, no copy), giving an output and a log-sum-exp per query row;
* the own tokens are attended per row (the query heads of a KV head folded into the query dimension);
* the two are merged with their log-sum-exps: ``out = own + sigmoid(lse_prefix - lse_own) * (prefix - own)``,
  which is softmax attention over all the keys, exactly (up to float rounding).

The mask transformers builds covers the prefix columns and then the own ones: it is split by columns.
Without a mask, every prefix key precedes every query and the own tokens are causal (queries last).
"""

from __future__ import annotations

import math

import torch

from ._compat import attention_with_lse
from .storage.split import SplitKV


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive float mask in ``dtype`` (0 attends, -inf does not) from a boolean or additive one."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def _masked(lse: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The lse of rows that see no key set to -inf (the kernel reports 0), so the merge gives them no weight."""
    if bias is None:
        return lse
    return lse.masked_fill(torch.isneginf(bias).all(dim=-1), float("-inf"))


def _merge(out_a, lse_a, out_b, lse_b, masked: bool, with_lse: bool = True):
    """Softmax attention over the keys of both parts, from each part's output and log-sum-exp (and their lse)."""
    weight = torch.sigmoid(lse_b - lse_a)  # share of part b: exp(lse_b) / (exp(lse_a) + exp(lse_b))
    if masked:  # a row neither part lets see anything: output 0, as SDPA gives
        weight = weight.nan_to_num(0.0)
    out = torch.lerp(out_a, out_b, weight.unsqueeze(-1).to(out_a.dtype))
    return out, torch.logaddexp(lse_a, lse_b) if with_lse else None


def split_attention(
    query: torch.Tensor,
    key: SplitKV,
    value: SplitKV,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    causal: bool = True,
) -> torch.Tensor | None:
    """SDPA's output for ``key``/``value`` given as a shared prefix and own tokens, without concatenating them.

    Args:
        query (`torch.Tensor`): ``[batch, q_heads, q, head_dim]``, the last ``q`` positions.
        key, value (`SplitKV`): ``[batch, kv_heads, P + n, head_dim]`` as prefix windows and own tokens (``n >= q``).
        attention_mask (`torch.Tensor`, *optional*): boolean (True attends) or additive, ``[batch or 1, 1, q, >= P + n]``.
        scaling (`float`, *optional*): softmax scale, ``1/sqrt(head_dim)`` by default.
        causal (`bool`, defaults to `True`): without a mask, queries see own tokens up to their own position.

    Returns:
        ``[batch, q, q_heads, head_dim]`` in the value dtype (as transformers' SDPA attention returns it), or
        ``None`` for a mask this pass does not split (one per head): the caller then attends the concatenation.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, own = key.own.shape[1], key.own.shape[2]
    groups, prefix = q_heads // kv_heads, key.shared_length
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1):
        return None
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    bias = None if attention_mask is None else _bias(attention_mask[..., : prefix + own], query.dtype)  # [b|1, 1, q, L]
    rows = batch * groups * q_len

    # The prefix: every batch row's queries in one query dimension, against the prefix's single row.
    q_rows = query.reshape(batch, kv_heads, groups * q_len, head_dim)  # query heads of a KV head, then positions
    q_shared = q_rows.transpose(0, 1).reshape(1, kv_heads, rows, head_dim)  # [1, kv_heads, b * g * q, d]
    shared_bias = None
    if bias is not None:  # [b|1, 1, q, P] -> [1, 1, b * g * q, P], rows in the order of q_shared
        shared_bias = bias[..., :prefix].expand(batch, groups, q_len, prefix).reshape(1, 1, rows, prefix)
    out_s = lse_s = None
    start = 0
    for keys, values in zip(key.shared, value.shared, strict=True):  # [1, kv_heads, P_i, head_dim] each
        stop = start + keys.shape[2]
        part_bias = None if shared_bias is None else shared_bias[..., start:stop]
        out, lse = attention_with_lse(q_shared, keys, values, part_bias, scale)  # [1, kvh, rows, dv], [1, kvh, rows]
        lse = _masked(lse, part_bias)
        out_s, lse_s = (out, lse) if out_s is None else _merge(out_s, lse_s, out, lse, bias is not None)
        start = stop

    # The rows' own tokens: the query heads of each KV head folded into the query dimension.
    own_bias = None
    if bias is not None:
        own_bias = bias[..., prefix:]  # [b|1, 1, q, n]
        if q_len > 1 and groups > 1:
            own_bias = own_bias.unsqueeze(1).expand(-1, groups, -1, -1, -1).reshape(-1, 1, groups * q_len, own)
    elif causal and q_len > 1:  # query i (of q, the last ones) sees own tokens 0 .. n - q + i
        seen = torch.arange(own, device=query.device)[None, :] <= torch.arange(own - q_len, own, device=query.device)[:, None]
        own_bias = _bias(seen, query.dtype).repeat(groups, 1)[None, None]  # [1, 1, g * q, n]
    out_n, lse_n = attention_with_lse(q_rows, key.own, value.own, own_bias, scale)  # [b, kvh, g * q, dv], [b, kvh, g * q]
    lse_n = _masked(lse_n, own_bias)

    dv = out_n.shape[-1]
    out_s = out_s[0].view(kv_heads, batch, groups * q_len, dv).transpose(0, 1)  # [b, kv_heads, g * q, dv] (a view)
    lse_s = lse_s[0].view(kv_heads, batch, groups * q_len).transpose(0, 1)
    out, _ = _merge(out_n, lse_n, out_s, lse_s, bias is not None, with_lse=False)  # [b, kv_heads, g * q, dv]
    out = out.view(batch, kv_heads, groups, q_len, dv).permute(0, 3, 1, 2, 4)  # [b, q, kv_heads, g, dv]
    return out.reshape(batch, q_len, q_heads, dv)
