"""Re-rotating cached keys to new positions (the StreamingLLM "position shift").

Models rotate keys with RoPE at their absolute positions before the cache sees them. Rotations
compose, so a key cached at position ``p`` moves to position ``p + delta`` by one more rotation
of angle ``delta * theta``. We always rotate from the key as it was cached (never a rotated copy),
so nothing drifts however long the stream runs. Only the ``rotate_half`` convention (Llama,
Mistral, Qwen, GPT-NeoX, Phi) is supported; with partial rotary embeddings the first
``2 * len(inv_freq)`` channels rotate and the rest pass through.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``keys`` (``[batch, heads, m, head_dim]``) forward by ``delta`` positions.

    ``delta`` broadcasts against ``[batch, heads, m]``. Angles are computed in float64 so that
    shifts of 100k positions keep their precision.
    """
    rot_dim = 2 * inv_freq.shape[-1]
    angles = delta.to(torch.float64).unsqueeze(-1) * inv_freq.to(keys.device, torch.float64)  # [..., m, rot/2]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
    rot = keys[..., :rot_dim].to(torch.float32)
    rotated = (rot * cos + rotate_half(rot) * sin).to(keys.dtype)
    if rot_dim == keys.shape[-1]:
        return rotated
    return torch.cat((rotated, keys[..., rot_dim:]), dim=-1)
