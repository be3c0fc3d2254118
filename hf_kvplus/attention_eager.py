"""The scoring attention for models the user runs with ``attn_implementation="eager"``: ``"kvplus_eager"``.

The ``"kvplus"`` attention of :mod:`hf_kvplus.attention` is SDPA's. A user who chose eager attention (for
``output_attentions=True``, or for its numerics) keeps eager: every call runs the model's own eager
attention function, so outputs and returned attention weights are exactly eager's, and the layers that
asked for attention mass (in their ``update``) get it from those same weights. :mod:`hf_kvplus.hooks`
switches a model to the variant of its own implementation only for the forwards that carry a scoring
cache, and back afterwards (:data:`VARIANTS`).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from ._compat import eager_attention, eager_mask
from .attention import ATTN_IMPLEMENTATION, take_request, register_attention

EAGER_IMPLEMENTATION = "kvplus_eager"
#: The user's attention implementation -> the scoring attention that computes the same thing.
VARIANTS = {"sdpa": ATTN_IMPLEMENTATION, "eager": EAGER_IMPLEMENTATION}


def mass_from_weights(weights: torch.Tensor, kv_heads: int, reduction: str, window: int | None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention mass :func:`hf_kvplus.attention.attend` reports, from eager's weights.

    Args:
        weights (`torch.Tensor`): ``[batch, q_heads, q_len, kv_len]`` attention probabilities.
        kv_heads (`int`): key/value heads (query heads of one KV head are averaged).
        reduction (`str`): ``"sum"``, ``"last"`` or ``"rows"`` (see ``attend``).
        window (`int`, *optional*): only the last ``window`` queries count.
        attention_mask (`torch.Tensor`, *optional*): the additive mask eager used, ``[batch, 1, q_len, kv_len]``;
            fully masked query rows (left padding) count for nothing, as in ``attend``.

    Returns:
        float32 ``[batch, kv_heads, kv_len]`` for ``"sum"``/``"last"``, ``[batch, kv_heads, q_len, kv_len]`` for ``"rows"``.
    """
    batch, q_heads, q_len, kv_len = weights.shape
    groups = q_heads // kv_heads
    probs = weights.detach().to(torch.float32).view(batch, kv_heads, groups, q_len, kv_len)
    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.shape[-2] == q_len:
        dead = (attention_mask == torch.finfo(attention_mask.dtype).min).all(dim=-1)  # [batch, 1, q_len]
        probs = probs.masked_fill(dead[:, :, None, :, None], 0.0)
    counted = q_len - 1 if reduction == "last" else 0 if window is None or reduction == "rows" else max(0, q_len - window)
    probs = probs[:, :, :, counted:]
    if reduction == "rows":
        return probs.mean(dim=2)  # [batch, kv_heads, q_len, kv_len]
    return probs.sum(dim=(2, 3)) / groups  # [batch, kv_heads, kv_len]


def kvplus_eager_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Eager attention (the model's own function) that also reports attention mass to the layer that asked.

    Returns what eager returns: ``(output [batch, q, q_heads, head_dim], weights [batch, q_heads, q, kv])``.
    """
    forward = eager_attention(module)
    output, weights = forward(module, query, key, value, attention_mask, **kwargs)
    layer = take_request(getattr(module, "layer_idx", None))
    if layer is None:
        return output, weights
    kv_heads = key.shape[1]
    if getattr(getattr(layer, "store", None), "keys_t3", None) is not None:  # a SlotStore decoding step
        batch, q_heads, _, slots = weights.shape
        layer.observe_slot_probs(weights.detach().to(torch.float32).reshape(batch * kv_heads, q_heads // kv_heads, slots))
        return output, weights
    reduction = layer.requested_reduction()
    window = None if reduction == "rows" else layer.attention_window()
    layer.observe_attention(mass_from_weights(weights, kv_heads, reduction, window, attention_mask), reduction)
    return output, weights


_registered = False


def register_variants() -> dict[str, str]:
    """Register every scoring attention (idempotent). Returns :data:`VARIANTS`."""
    global _registered
    register_attention()
    if not _registered:
        AttentionInterface.register(EAGER_IMPLEMENTATION, kvplus_eager_attention_forward)
        AttentionMaskInterface.register(EAGER_IMPLEMENTATION, eager_mask)
        _registered = True
    return VARIANTS
