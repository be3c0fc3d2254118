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

import functools

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


@functools.lru_cache(maxsize=16)
def _hadamard64(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
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
    return _hadamard64(size).to(dtype=dtype, device=device)


class KeyBasis:
    """The rotation matrix the stores of one cache share, made once per (head_dim, dtype, device) and held once.

    Example:

    ```python
    >>> basis = KeyBasis()
    >>> basis.matrix(64, torch.float32, "cpu").shape
    torch.Size([64, 64])
    ```
    """

    def __init__(self) -> None:
        self._matrices: dict = {}  # (head_dim, dtype, device) -> [head_dim, head_dim]
        self._expanded: dict = {}  # (rows, head_dim, dtype, device) -> [rows, head_dim, head_dim] (a view)

    def matrix(self, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (head_dim, dtype, str(device))
        if key not in self._matrices:
            self._matrices[key] = hadamard(head_dim, dtype, device)
        return self._matrices[key]

    def expanded(self, rows: int, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The matrix as ``[rows, head_dim, head_dim]`` (an expanded view, no copy) for a batched product."""
        return self.matrix(head_dim, dtype, device).expand(rows, head_dim, head_dim)

    def tensors(self) -> list[torch.Tensor]:
        return list(self._matrices.values())

    @staticmethod
    def predict_nbytes(head_dim: int, dtype: torch.dtype) -> int:
        return head_dim * head_dim * dtype.itemsize
