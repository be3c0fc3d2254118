"""An orthogonal rotation of keys per head before per-channel quantization (QuaRot arXiv:2404.00456, RotateKV
arXiv:2501.16383).

A Hadamard matrix ``H`` (``[head_dim, head_dim]``, entries ``+-1/sqrt(head_dim)``, ``H @ H.T = I``) mixes every
channel into every other: a key's few large outlier channels are spread over all of them, so the range each
quantization group must cover shrinks. Keys are stored as ``keys @ H`` and restored as ``restored @ H.T``, so
attention sees keys in their own basis and scores are unchanged (``q . k = (q @ H) . (k @ H)``) up to the
quantization error; the store does the inverse rotation itself (one ``[head_dim, head_dim]`` matrix product per
step over the history), which leaves every attention implementation as it is.
"""

from __future__ import annotations

import torch

ROTATIONS = (None, "hadamard")


def check_rotation(rotation, head_dim: int | None = None):
    """``rotation`` if it is one of :data:`ROTATIONS` and fits ``head_dim`` (when known), else a ``ValueError``.

    Raises:
        ValueError: an unknown rotation, or a Hadamard rotation of a ``head_dim`` that is not a power of two.
    """
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {list(ROTATIONS)}, got {rotation!r}")
    if rotation == "hadamard" and head_dim is not None and (head_dim < 2 or head_dim & (head_dim - 1)):
        raise ValueError(
            f"rotation='hadamard' needs a head_dim that is a power of two (Sylvester's construction), got "
            f"head_dim={head_dim}; use rotation=None for this model"
        )
    return rotation


def _hadamard64(size: int, device=None) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size**0.5


def hadamard(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix ``[size, size]`` (symmetric: ``H == H.T``, ``H @ H = I``).

    Example:

    ```python
    >>> h = hadamard(64)
    >>> torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)
    True
    ```
    """
    check_rotation("hadamard", size)
    return _hadamard64(size, device).to(dtype=dtype)


class KeyBasis:
    """The key transforms the stores of one cache share, made once per (head_dim, dtype, device) and held once: the
    rotation matrix, and for keys quantized before RoPE the products and angle tables that re-apply it.

    Args:
        rope (`tuple`, *optional*): ``(inv_freq, attention_scaling, layout)`` of the model
            (:func:`hf_kvplus._compat.rope_parameters`) for keys quantized before RoPE (KVQuant, arXiv:2401.18079).

    Example:

    ```python
    >>> basis = KeyBasis()
    >>> basis.matrix(64, torch.float32, "cpu").shape
    torch.Size([64, 64])
    ```
    """

    def __init__(self, rope=None) -> None:
        self.rope = None if rope is None else (tuple(float(f) for f in torch.as_tensor(rope[0]).tolist()), *rope[1:])
        self._matrices: dict = {}  # (head_dim, dtype, device) -> [head_dim, head_dim]
        self._wide: dict = {}  # (rotated, head_dim, dtype, device) -> [head_dim, 2 * head_dim]: [H | H R]
        self._angles: dict = {}  # (start, head_dim, dtype, device) -> [capacity, 2, head_dim]: cos, sin

    def wide(self, rotated: bool, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
        """``[head_dim, 2 * head_dim]``: ``[H | H @ R]`` (``[I | R]`` unrotated), ``R`` the RoPE layout's
        ``rotate_half`` as a matrix, so one product gives a key and its ``rotate_half`` in the model's basis."""
        from ..rope import layout_of, rotate

        key = (rotated, head_dim, dtype, str(device))
        if key not in self._wide:
            base = _hadamard64(head_dim, device) if rotated else torch.eye(head_dim, dtype=torch.float64, device=device)
            rot_dim = 2 * len(self.rope[0])
            turned = torch.zeros_like(base)
            turned[:, :rot_dim] = rotate(base[:, :rot_dim], layout_of(self.rope))  # channels past rot_dim: no sin
            self._wide[key] = torch.cat([base, turned], dim=1).to(dtype=dtype, device=device)
        return self._wide[key]

    def angles(self, start: int, tokens: int, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
        """``[tokens, 2, head_dim]``: cos and sin of positions ``start..start+tokens-1`` per channel (1 and 0 for the
        channels RoPE leaves alone), grown by doubling and sliced (no allocation per step)."""
        from ..rope import channel_freq, layout_of

        key = (start, head_dim, dtype, str(device))
        held = self._angles.get(key)
        if held is None or held.shape[0] < tokens:
            size = max(tokens, 2 * (0 if held is None else held.shape[0]))
            inv_freq = torch.tensor(self.rope[0], dtype=torch.float64, device=device)
            freq = channel_freq(inv_freq, layout_of(self.rope))  # [rot_dim]
            angles = torch.arange(start, start + size, dtype=torch.float64, device=device)[:, None] * freq
            table = torch.zeros(size, 2, head_dim, dtype=torch.float64, device=device)  # [size, (cos, sin), d]
            table[:, 0] = 1.0
            table[:, 0, : freq.shape[0]], table[:, 1, : freq.shape[0]] = angles.cos(), angles.sin()
            self._angles[key] = held = table.to(dtype=dtype, device=device)
        return held[:tokens]

    def matrix(self, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (head_dim, dtype, str(device))
        if key not in self._matrices:
            self._matrices[key] = hadamard(head_dim, dtype, device)
        return self._matrices[key]

    def expanded(self, rows: int, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The matrix as ``[rows, head_dim, head_dim]`` (an expanded view, no copy) for a batched product."""
        return self.matrix(head_dim, dtype, device).expand(rows, head_dim, head_dim)

    def tensors(self) -> list[torch.Tensor]:
        return [*self._matrices.values(), *self._wide.values(), *self._angles.values()]

