"""Dequantization of a whole packed KV history in four aten ops, into a buffer reused across layers and steps.

The eager kernels of :mod:`.minmax` allocate and unpack per call (about ten ops per tensor). On the decode
hot path (``DESIGN.md`` section 2b) every op is a kernel launch, so the history of one layer, keys and
values packed side by side as ``[2, batch, kv_heads, tokens, head_dim * nbits / 8]``, is restored by:

1. one ``bitwise_and`` of every byte with ``k = 8 / nbits`` broadcast masks: code ``j`` of each byte stays
   in place, times ``2**(j * nbits)`` (``uint8``, split order of :mod:`.packing`, so the result is already
   in channel order), skipped for int8;
2. one ``mul`` by ``2**(-j * nbits)`` into the model dtype (exact: a power of two), a ``copy_`` for int8;
3. one ``addcmul`` per keys and values, in place: ``zero + code * scale`` with scales broadcast per channel
   and group of tokens (keys) or per token and group of channels (values), KIVI's layout (arXiv:2402.02750).

The values equal :func:`~hf_kvplus.quant.dequantize_keys` / :func:`~hf_kvplus.quant.dequantize_values` up to
the rounding of the model dtype (``addcmul`` computes in the promoted dtype of scales and model dtype).
"""

from __future__ import annotations

import weakref

import torch

from .packing import codes_per_byte


class DequantScratch:
    """Buffers shared by the layers of one cache: the restored keys and values, and unpacked codes.

    ``out`` is a flat buffer in the model dtype; :meth:`restored` views its first elements as a contiguous
    ``[2, batch, kv_heads, tokens, head_dim]`` (keys at 0, values at 1), so a compiled kernel writes one whole
    tensor (:mod:`.compiled`). ``codes`` is ``[2, batch, kv_heads, history capacity, head_dim]`` ``uint8``
    (int4/int2 eager path only). Both grow to the largest layer's need (never shrink), so after a layer's
    attention the next layer overwrites them: what a store returns from them is valid until the next layer's
    ``update``. ``generation`` changes whenever they are reallocated, so stores know when their cached views
    went stale.

    Example:

    ```python
    >>> scratch = DequantScratch()
    >>> scratch.ensure(1, 2, 64, torch.float32, "cpu", tokens=320, history=256, unpacked=True)
    >>> scratch.restored(1, 2, 300, 64).shape
    torch.Size([2, 1, 2, 300, 64])
    ```
    """

    def __init__(self, planes: int = 2) -> None:
        if planes not in (2, 3):
            raise ValueError(f"planes must be 2 (keys, values) or 3 (rotated keys too), got {planes!r}")
        #: Planes of ``[batch, kv_heads, tokens, head_dim]`` in ``out``: keys and values, plus the keys rotated back
        #: to their own basis for stores with a rotation (:meth:`pair`).
        self.planes = planes
        self.out: torch.Tensor | None = None  # [planes * batch * kv_heads * tokens * head_dim], model dtype
        self._geometry: tuple | None = None  # (batch, kv_heads, head_dim, dtype, device) of `out`
        self.codes: torch.Tensor | None = None  # [2, batch, kv_heads, history, head_dim] uint8
        self.wide: torch.Tensor | None = None  # [batch * kv_heads * history * 2 * head_dim]: keys before RoPE only
        self.generation = 0
        self._constants: dict = {}
        self.slots: torch.Tensor | None = None  # [slots] long: the residual slot index of a step
        self.slot_views: list[torch.Tensor] = []  # slot i as a [1] view of `slots`
        self._users = weakref.WeakSet()  # stores holding views of the buffers: told when they are reallocated

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_users": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._users = weakref.WeakSet()

    def tensors(self) -> list[torch.Tensor]:
        held = [t for t in (self.out, self.codes, self.slots, self.wide) if t is not None]
        return held + [t for pair in self._constants.values() for t in pair]

    def prepare(self, slots: int, nbits: int, dtype: torch.dtype, device) -> None:
        """Slot indices ``0..slots-1`` and the unpacking constants, made at a store's first token (not per step)."""
        if self.slots is None or self.slots.device != torch.device(device) or self.slots.shape[0] < slots:
            self.slots = torch.arange(slots, device=device)  # [slots]
            self.slot_views = list(self.slots.split(1))
        if nbits < 8:
            self.constants(nbits, dtype, device)

    @staticmethod
    def predict_prepared_nbytes(slots: int, nbits: int, dtype: torch.dtype) -> int:
        """Bytes of :meth:`prepare`'s tensors: ``8 * slots`` plus ``k`` masks and ``k`` factors (int4/int2)."""
        k = 8 // nbits
        return 8 * slots + (k * (1 + dtype.itemsize) if nbits < 8 else 0)

    def _reallocated(self) -> None:
        self.generation += 1
        for store in list(self._users):
            store._views = None  # drop views of the old buffers (their memory is freed now)

    def ensure(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device, tokens: int, history: int,
               unpacked: bool) -> None:
        """Make ``out`` hold ``tokens`` and ``codes`` ``history`` tokens (reallocating, never shrinking)."""
        out, codes = self.out, self.codes
        geometry = (batch, heads, head_dim, dtype, torch.device(device))
        same = out is not None and self._geometry == geometry
        held = 0 if out is None else out.numel() // (self.planes * batch * heads * head_dim)
        if not same or held < tokens:
            size = tokens if not same else max(tokens, held)
            self.out = torch.zeros(self.planes * batch * heads * size * head_dim, dtype=dtype, device=device)
            self._geometry = geometry
            self._reallocated()
            if not same:
                self.codes = codes = None
        if unpacked and (codes is None or codes.shape[3] < history):
            size = history if codes is None else max(history, codes.shape[3])
            self.codes = torch.zeros(2, batch, heads, size, head_dim, dtype=torch.uint8, device=device)
            self._reallocated()

    def restored(self, batch: int, heads: int, tokens: int, head_dim: int) -> torch.Tensor:
        """Elements of ``out`` as a contiguous ``[2, batch, heads, tokens, head_dim]`` (after :meth:`ensure`): the first
        ones, or after the rotated plane (``planes=3``, whose layout is ``[rotated keys | keys | values]``)."""
        size = batch * heads * tokens * head_dim
        lead = (self.planes - 2) * size
        return self.out[lead : lead + 2 * size].view(2, batch, heads, tokens, head_dim)

    def wide_view(self, rows: int, tokens: int, width: int, dtype: torch.dtype, device, capacity: int) -> torch.Tensor:
        """``[rows, tokens, width]`` of a buffer for ``capacity`` tokens (keys before RoPE: each key beside its
        ``rotate_half``), grown by doubling, never shrunk."""
        need = rows * capacity * width
        if self.wide is None or self.wide.numel() < need or self.wide.dtype != dtype or self.wide.device != torch.device(device):
            self.wide = torch.zeros(need, dtype=dtype, device=device)
            self._reallocated()
        return self.wide[: rows * tokens * width].view(rows, tokens, width)

    def pair(self, batch: int, heads: int, tokens: int, head_dim: int) -> torch.Tensor:
        """``[2, batch, heads, tokens, head_dim]``: the rotated-back keys (plane 0) and the values (plane 2), as one
        strided view, so one copy writes the exact tokens of both (``planes=3`` only)."""
        if self.planes != 3:
            raise ValueError("pair() needs a scratch made with planes=3")
        size = batch * heads * tokens * head_dim
        return self.out[: 3 * size].as_strided((2, batch, heads, tokens, head_dim),
                                                (2 * size, heads * tokens * head_dim, tokens * head_dim, head_dim, 1))

    def constants(self, nbits: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``masks`` ``[k, 1]`` (``uint8``) and ``factors`` ``[k, 1]`` (``dtype``) of :func:`dequantize_history`."""
        key = (nbits, dtype, str(device))
        if key not in self._constants:
            k = codes_per_byte(nbits)
            masks = torch.tensor([((1 << nbits) - 1) << (j * nbits) for j in range(k)], dtype=torch.uint8, device=device)
            factors = torch.tensor([2.0 ** (-j * nbits) for j in range(k)], dtype=dtype, device=device)
            self._constants[key] = masks.view(k, 1), factors.view(k, 1)
        return self._constants[key]


LOW_NIBBLES = 0x0F0F0F0F  # int32 words of four bytes: the low nibble of each
HIGH_NIBBLES = 0xF0F0F0F0 - (1 << 32)  # the high nibble of each (as a signed int32)


def int4_planes(packed: torch.Tensor, codes: torch.Tensor, history: torch.Tensor):
    """Views for the int4 path of :func:`dequantize_history`, or ``None`` when the bytes do not form int32 words.

    ``packed`` ``[2, b, h, n, 1, w]``, ``codes`` ``[2, b, h, n, 2, w]`` (uint8), ``history`` ``[2, b, h, n, 2, w]``.
    """
    if packed.shape[-1] % 4 or packed.stride(-1) != 1 or packed.storage_offset() % 4 or codes.storage_offset() % 4:
        return None
    words, out = packed[..., 0, :].view(torch.int32), codes.view(torch.int32)  # [2, b, h, n, w / 4]
    return (words, out[..., 0, :]), (words, out[..., 1, :]), history[..., 1, :]


def unpack_codes(packed, codes, history, masks=None, factors=None) -> None:
    """Codes of ``packed`` (``[..., n, 1, w]`` uint8) into ``history`` (``[..., n, k, w]``, model dtype) in two ops
    through ``codes`` (``[..., n, k, w]`` uint8 scratch), or one copy for int8 (``codes`` ``None``)."""
    if codes is None:
        history.copy_(packed)  # int8: one code per byte
    else:
        torch.bitwise_and(packed, masks, out=codes)  # code j times 2**(j * nbits), in channel order
        torch.mul(codes, factors, out=history)  # exact codes in the model dtype


def dequantize_history(packed, codes, history, key_out, key_scale, key_zero, value_out, value_scale, value_zero,
                       masks=None, factors=None, planes=None, values_addcmul: bool = False) -> None:
    """Restore keys and values of a packed history into ``history`` (all arguments are prepared views).

    Args:
        packed (`torch.Tensor`): ``[2, b, h, n, 1, w]`` ``uint8``, keys then values (``w = d * nbits / 8``).
        codes (`torch.Tensor` or `None`): ``[2, b, h, n, k, w]`` ``uint8`` scratch (``None`` for int8, ``k = 1``).
        history (`torch.Tensor`): ``[2, b, h, n, k, w]`` in the model dtype, written.
        key_out (`torch.Tensor`): the keys of ``history`` as ``[b, h, n / group, group, d]``.
        key_scale, key_zero (`torch.Tensor`): ``[b, h, n / group, 1, d]``.
        value_out (`torch.Tensor`): the values of ``history`` as ``[b, h, n, d / value_group, value_group]``.
        value_scale, value_zero (`torch.Tensor`): ``[b, h, n, d / value_group, 1]``.
        masks, factors (`torch.Tensor`): ``[k, 1]`` from :meth:`DequantScratch.constants` (int4 and int2).
        planes (`tuple`, *optional*): int4 only, from :func:`int4_planes`: the same unpacking in four ops without
            broadcasting (each nibble plane masked as int32 words, converted, the high plane scaled by 1/16),
            about 2.5x faster on CPU than the two broadcast ops.
        values_addcmul (`bool`, defaults to `False`): restore values in one ``addcmul`` (one op fewer, slower on CPU)
            instead of a ``mul_`` and an ``add_``.
    """
    if planes is not None:
        (low_in, low_out), (high_in, high_out), high_history = planes
        torch.bitwise_and(low_in, LOW_NIBBLES, out=low_out)  # [2, b, h, n, w / 4] int32 words of uint8 codes
        torch.bitwise_and(high_in, HIGH_NIBBLES, out=high_out)
        history.copy_(codes)
        high_history.mul_(1.0 / 16)  # high nibbles were read in place: code * 16
    else:
        unpack_codes(packed, codes, history, masks, factors)
    torch.addcmul(key_zero, key_out, key_scale, out=key_out)
    if values_addcmul:
        torch.addcmul(value_zero, value_out, value_scale, out=value_out)
        return
    # Values: scale and zero are one per row, broadcast along the channels; a multiply then an add runs about 5x
    # faster on CPU than one addcmul with that broadcast (0.17 vs 0.85 ms at 8k tokens x 3 heads x 64).
    value_out.mul_(value_scale)
    value_out.add_(value_zero)
