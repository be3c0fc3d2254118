"""Re-rotating cached keys to new positions (the StreamingLLM "position shift").

Models rotate keys with RoPE at their absolute positions before the cache sees them. Rotations
compose, so a key cached at position ``p`` moves to position ``p + delta`` by one more rotation
of angle ``delta * theta``. We always rotate from the key as it was cached (never a rotated copy),
so nothing drifts however long the stream runs.

Two channel layouts exist in transformers (:data:`LAYOUTS`): ``"half"`` pairs channel ``i`` with
``i + rot/2`` (``rotate_half``: Llama, Mistral, Qwen, GPT-NeoX, Phi) and ``"interleaved"`` pairs
``2i`` with ``2i + 1`` (Cohere, GLM). With partial rotary embeddings the first ``2 * len(inv_freq)``
channels rotate and the rest pass through. Which layout a model uses is not read from its name:
``hf_kvplus._compat.rope_parameters`` checks each layout against the model's own rotation.
"""

from __future__ import annotations

import torch

LAYOUTS = ("half", "interleaved")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The interleaved layout's ``rotate_half``: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rotate(x: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """``rotate_half`` of ``layout`` (see :data:`LAYOUTS`) over the last dimension of ``x``."""
    if layout == "half":
        return rotate_half(x)
    if layout == "interleaved":
        return rotate_pairs(x)
    raise ValueError(f"RoPE layout must be one of {LAYOUTS}, got {layout!r}")


def channel_freq(inv_freq: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Frequency of each rotated channel (``[2 * len(inv_freq)]``) in ``layout``."""
    if layout == "interleaved":
        return inv_freq.repeat_interleave(2, dim=-1)
    return torch.cat((inv_freq, inv_freq), dim=-1)


def shift_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate ``keys`` (``[batch, heads, m, head_dim]``) forward by ``delta`` positions.

    ``delta`` broadcasts against ``[batch, heads, m]``. Angles are computed in float64 so that
    shifts of 100k positions keep their precision. ``layout``: see :data:`LAYOUTS`.
    """
    rot_dim = 2 * inv_freq.shape[-1]
    freq = channel_freq(inv_freq.to(keys.device, torch.float64), layout)  # [rot]
    angles = delta.to(torch.float64).unsqueeze(-1) * freq  # [..., m, rot]
    cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
    rot = keys[..., :rot_dim].to(torch.float32)
    rotated = (rot * cos + rotate(rot, layout) * sin).to(keys.dtype)
    if rot_dim == keys.shape[-1]:
        return rotated
    return torch.cat((rotated, keys[..., rot_dim:]), dim=-1)


def layout_of(rope) -> str:
    """The layout of a ``rope`` tuple ``(inv_freq, attention_scaling[, layout])`` (``"half"`` when it has none)."""
    return rope[2] if len(rope) > 2 else "half"
