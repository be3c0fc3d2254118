"""What packed storage holds, counted (predicted bytes, exact bits per element), and the key basis it quantizes in."""

from __future__ import annotations

import torch

from ..quant import packed_size
from ..quant.fused import DequantScratch


class PackedAccounting:
    """Bytes and bits of :class:`~hf_kvplus.storage.packed.QuantizedStore`, and its key rotation (a mixin)."""

    def predict_nbytes(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of codes, scales, zero points and the residual after ``tokens`` appended tokens (no eviction).

        With ``nq, residual = split(tokens)`` and ``cap`` = ``nq`` rounded up to a power of two of groups (the
        history grows by doubling; exactly ``nq`` for a store without a scratch), per row and head: ``2 * cap * head_dim * nbits / 8`` of codes,
        ``2 * (cap / group_size) * head_dim`` key scales and zero points, ``2 * cap * head_dim / value_group`` value
        ones (``scale_dtype``), and ``2 * (residual_length + group_size) * head_dim`` in ``dtype`` for the residual
        buffer (held while it holds tokens, or always with a scratch). The scratch is :meth:`shared_nbytes`.
        """
        if not tokens:
            return 0
        nq, residual = self.split(tokens)
        capacity, rows = self._capacity(nq) if self.scratch is not None else (nq, nq // self.group_size)
        scale = self.scale_dtype.itemsize
        value_group = min(self.group_size, head_dim)
        codes = capacity * (packed_size(head_dim, self.key_bits) + packed_size(head_dim, self.value_bits))
        scales = 2 * rows * head_dim * scale + 2 * capacity * (head_dim // value_group) * scale
        exact = 2 * self.residual_capacity * head_dim * dtype.itemsize if residual or self.scratch else 0
        sinks = 2 * self.sinks * head_dim * dtype.itemsize
        return batch * kv_heads * (codes + scales + exact + sinks)

    def shared_nbytes(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> dict:
        """``{id(scratch): bytes}`` of the scratch this store shares with the other layers after ``tokens``.

        The restored keys and values (``2 * batch * kv_heads * (cap + residual_length + group_size) * head_dim`` in
        ``dtype``) and the unpacked codes (``uint8``, int4/int2) are allocated at the first decoding step over a
        quantized history: this counts them once ``tokens`` leave a history, as after ``generate``.
        """
        nq, _ = self.split(tokens)
        capacity, _ = self._capacity(nq)
        basis = {}
        if self.basis is not None and nq:  # the rotation matrix from the first flush; RoPE tables from the first step
            held = head_dim * head_dim if self.rotation is not None else 0
            if self.rope is not None and self.scratch is not None:
                held += 2 * head_dim * head_dim + capacity * 2 * head_dim
            basis = {id(self.basis): held * dtype.itemsize}
        if not tokens or self.scratch is None:
            return basis
        prepared = DequantScratch.predict_prepared_nbytes(self.residual_capacity, self.key_bits, dtype)
        if self.mixed:  # the values' unpacking constants (the slot indices are counted once)
            prepared += DequantScratch.predict_prepared_nbytes(0, self.value_bits, dtype)
        planes, held = self.scratch.planes, capacity + self.residual_capacity + self.sinks
        out = planes * batch * kv_heads * held * head_dim * dtype.itemsize if nq else 0
        if self.rope is not None and nq:  # the keys and their rotate_half side by side, [b, h, capacity, 2 * d]
            out += 2 * batch * kv_heads * capacity * head_dim * dtype.itemsize
        codes = 2 * batch * kv_heads * capacity * head_dim if min(self.bits) < 8 else 0
        return {id(self.scratch): prepared + out + codes, **basis}

    @property
    def bits(self) -> tuple[int, ...]:
        """The distinct code widths, keys' first: ``(4,)`` for int4, ``(4, 2)`` for K4V2."""
        return (self.key_bits,) if not self.mixed else (self.key_bits, self.value_bits)

    def bits_per_element(self) -> float | None:
        """Bits held per key or value element: every tensor of this store (codes, scales, zero points, the group map,
        the residual buffer and sinks in the model dtype; a shared scratch and rotation matrix excluded), times 8,
        over ``2 * batch * kv_heads * length * head_dim`` (``None`` while empty)."""
        if not self.length:
            return None
        b, h, d = *self._res.shape[1:3], self._res.shape[-1]
        held = [t for t in (self._codes,) if t is not None] if not self.mixed else [t for t in (self._kbuf, self._vbuf) if t is not None]
        held += [t for t in (self._key_params, self._value_params, self.key_groups, self._res, self._sink) if t is not None]
        return 8 * sum(t.untyped_storage().nbytes() for t in held) / (2 * b * h * self.length * d)

    def history_bits_per_element(self) -> float | None:
        """Bits per element of the quantized history alone: codes, scales, zero points and group map as held (with
        their spare capacity), over its ``2 * batch * kv_heads * quantized_length * head_dim`` elements."""
        if not self.quantized_length:
            return None
        b, h, _, d = self.key_scale.shape
        held = [t for t in self.history_tensors()]
        return 8 * sum(t.numel() * t.element_size() for t in held) / (2 * b * h * self.quantized_length * d)

    # ------------------------------------------------------------ rotation
    def to_basis(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys ``[b, h, t, d]`` in the basis they are quantized in (``keys @ H`` with a rotation, else as given)."""
        if self.rotation is None:
            return keys
        return torch.matmul(keys, self.basis.matrix(keys.shape[-1], keys.dtype, keys.device))

    def from_basis(self, keys: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_basis` (``H`` is symmetric and orthonormal: ``H.T = H``, ``H @ H = I``)."""
        return self.to_basis(keys)
