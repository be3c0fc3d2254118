"""Bit packing of integer codes into bytes: one int8, two int4 or four int2 codes per ``uint8``.

Codes are packed along the last dimension in *split* order: with ``k = 8 // nbits`` codes per byte,
the last dimension ``d`` is cut into ``k`` contiguous slices of ``d / k`` and slice ``j`` occupies
bits ``[j * nbits, (j + 1) * nbits)`` of every byte. Unpacking is then ``k`` shifts and masks
written into contiguous slices (no interleaving), and every row of the leading dimensions (a
token, for KV caches) stays in whole bytes, so tokens can be gathered, reordered or dropped
directly in packed form.
"""

from __future__ import annotations

import torch

SUPPORTED_NBITS = (8, 4, 2)


def check_nbits(nbits, name: str = "nbits") -> int:
    """``nbits`` if it is one of :data:`SUPPORTED_NBITS`, else a ``ValueError`` naming ``name`` and the allowed values.

    3-bit codes are refused: they do not pack a token into whole bytes by this layout (one to four codes per byte).
    """
    if isinstance(nbits, bool) or nbits not in SUPPORTED_NBITS:
        hint = " (3-bit codes are not packed: use 4, or 2 with rotation='hadamard')" if nbits == 3 else ""
        raise ValueError(f"{name} must be one of {{8, 4, 2}}, got {nbits!r}{hint}")
    return int(nbits)


def codes_per_byte(nbits: int) -> int:
    return 8 // check_nbits(nbits)


def packed_size(size: int, nbits: int) -> int:
    """Bytes holding ``size`` codes of ``nbits`` bits (``size`` must fill whole bytes)."""
    per_byte = codes_per_byte(nbits)
    if size % per_byte:
        raise ValueError(
            f"cannot pack {size} codes of {nbits} bits: the last dimension must be a multiple of {per_byte} "
            f"({per_byte} codes per byte)"
        )
    return size // per_byte


def pack(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack ``uint8`` codes ``[..., d]`` (values below ``2**nbits``) into ``[..., d * nbits / 8]`` bytes.

    Example:

    ```python
    >>> codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    >>> pack(codes, 2)  # 1 | 2 << 2 | 3 << 4 | 0 << 6
    tensor([[57]], dtype=torch.uint8)
    ```
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {codes.dtype}")
    width = packed_size(codes.shape[-1], nbits)
    if nbits == 8:
        return codes.contiguous()
    parts = codes.split(width, dim=-1)  # k slices of [..., d / k]
    packed = parts[0].clone()
    for j, part in enumerate(parts[1:], start=1):
        packed |= part << (j * nbits)
    return packed


def unpack(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., w]`` bytes to ``[..., w * 8 / nbits]`` codes (``uint8``)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be a uint8 tensor, got {packed.dtype}")
    per_byte = codes_per_byte(nbits)
    if nbits == 8:
        return packed
    mask = (1 << nbits) - 1
    out = packed.new_empty(*packed.shape[:-1], packed.shape[-1] * per_byte)
    if packed.shape[-1] % 4 == 0 and packed.is_contiguous() and packed.storage_offset() % 4 == 0:
        # Four bytes per int32 operation: the same shifts and masks, a quarter of the elements.
        packed, out, mask = packed.view(torch.int32), out.view(torch.int32), mask * 0x01010101
    for j, part in enumerate(out.split(packed.shape[-1], dim=-1)):
        shifted = packed >> (j * nbits) if j else packed
        torch.bitwise_and(shifted, mask, out=part)
    return out.view(torch.uint8)
