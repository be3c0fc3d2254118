"""Packed int8/int4/int2 storage for any cache layer (KIVI, arXiv 2402.02750): the storage axis.
The newest tokens sit in a full-precision *residual*; once it holds ``residual_length + group_size``
tokens, its oldest ``group_size`` are quantized as one block, never touched again: quantization
costs O(new tokens) per step and errors never compound. Keys are quantized per channel over groups
of tokens, values per token over groups of channels (:mod:`hf_kvplus.quant`). Attention gets the
history dequantized into a transient buffer, then the residual and the new tokens exactly.

Eviction gathers whole-byte token rows (memory is freed); partly evicted key groups keep their
scale row, which tokens find through ``key_groups``. See ``docs/strategies/quantized.md``.
"""

from __future__ import annotations

import torch

from ..quant import check_nbits, check_scale_dtype, dequantize_keys, dequantize_values, minmax_quantize, pack
from ..quant import packed_size, quantize_keys, quantize_values
from ..quant.minmax import check_backend
from .base import _positive_int
from .store import KVStore, gather_tokens


def _cat(old: torch.Tensor | None, new: torch.Tensor, dim: int = 2) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=dim)


class QuantizedStore(KVStore):
    """Keys and values packed to ``nbits`` bits behind a full-precision residual window.

    Args:
        nbits (`int`, defaults to 4): bits per code, one of 8, 4, 2.
        group_size (`int`, defaults to 64): tokens per key group (per channel) and channels per value
            group (per token; capped at ``head_dim``).
        residual_length (`int`, defaults to 128): newest tokens always kept in full precision; a
            multiple of ``group_size``. Up to ``residual_length + group_size - 1`` are held at once.
        scale_dtype (`torch.dtype`, defaults to `torch.float16`): dtype of scales and zero points.
        backend (`str`, defaults to ``"torch"``): ``"quanto"`` runs code rounding and unpacking in
            optimum-quanto; the stored layout is the same.

    Example:

    ```python
    >>> store = QuantizedStore(nbits=4, group_size=32, residual_length=64)
    >>> store.append(keys, values)  # [batch, kv_heads, tokens, head_dim]
    >>> restored_keys, restored_values = store.get()
    ```
    """

    def __init__(self, nbits=4, group_size=64, residual_length=128, scale_dtype=torch.float16, backend="torch"):
        self.nbits = check_nbits(nbits)
        group_size = _positive_int("group_size", group_size)
        residual_length = _positive_int("residual_length", residual_length, minimum=0)
        if residual_length % group_size:
            raise ValueError(
                f"residual_length ({residual_length}) must be a multiple of group_size ({group_size}), "
                f"for example {max(group_size, residual_length // group_size * group_size)}"
            )
        self.group_size, self.residual_length = group_size, residual_length
        self.scale_dtype, self.backend = check_scale_dtype(scale_dtype), check_backend(backend)
        self._drop_history()
        self.res_keys = self.res_values = None  # [b, h, r, head_dim] in the model's dtype

    HISTORY = ("key_codes", "key_scale", "key_zero", "key_groups", "value_codes", "value_scale", "value_zero")

    def _drop_history(self) -> None:
        self.key_codes = self.value_codes = None  # [b, h, nq, head_dim * nbits / 8] uint8
        self.key_scale = self.key_zero = None  # [b, h, key groups, head_dim]
        self.key_groups = None  # None: token i is in group i // group_size; else [nq] or [b, h, nq] int32
        self.value_scale = self.value_zero = None  # [b, h, nq, head_dim / value group]

    quantized_length = property(lambda self: 0 if self.key_codes is None else self.key_codes.shape[2])
    residual = property(lambda self: 0 if self.res_keys is None else self.res_keys.shape[2])

    @property
    def length(self) -> int:
        return self.quantized_length + self.residual

    def history_tensors(self) -> list[torch.Tensor]:
        """The tensors of the quantized history: codes, scales, zero points and the group map."""
        return [getattr(self, name) for name in self.HISTORY if getattr(self, name) is not None]

    def tensors(self) -> list[torch.Tensor]:
        return self.history_tensors() + [t for t in (self.res_keys, self.res_values) if t is not None]

    def split(self, tokens: int) -> tuple[int, int]:
        """``(quantized, residual)`` tokens held after appending ``tokens`` (in any chunks, without eviction)."""
        flush = max(0, (tokens - self.residual_length) // self.group_size) * self.group_size
        return flush, tokens - flush

    def predict_nbytes(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of codes, scales, zero points and the residual after ``tokens`` appended tokens (no eviction).

        Per head: ``2 * nq * head_dim * nbits / 8`` of codes, ``2 * (nq / group_size) * head_dim`` key scales and
        zero points, ``2 * nq * head_dim / value_group`` value ones (``scale_dtype``), ``2 * residual * head_dim`` in
        ``dtype``, with ``nq, residual = split(tokens)``.
        """
        nq, residual = self.split(tokens)
        scale = self.scale_dtype.itemsize
        value_group = min(self.group_size, head_dim)
        rows = batch * kv_heads
        codes = 2 * nq * packed_size(head_dim, self.nbits)
        scales = 2 * (nq // self.group_size) * head_dim * scale + 2 * nq * (head_dim // value_group) * scale
        exact = 2 * residual * head_dim * dtype.itemsize
        return rows * (codes + scales + exact)

    # ------------------------------------------------------------ append/get
    def update(self, keys, values):
        """Append, returning the held tokens reconstructed and the new ones exactly as given."""
        out = self._reconstruct(keys, values)
        self.append(keys, values)
        return out

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._reconstruct()

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.res_keys is None and self.key_codes is None:
            self.dtype = keys.dtype
            self.value_group = min(self.group_size, keys.shape[-1])
            if keys.shape[-1] % self.value_group:
                raise ValueError(f"head_dim ({keys.shape[-1]}) must be a multiple of group_size ({self.group_size})")
            packed_size(keys.shape[-1], self.nbits)
        res_keys = keys.contiguous().clone() if self.res_keys is None else _cat(self.res_keys, keys)
        res_values = values.contiguous().clone() if self.res_values is None else _cat(self.res_values, values)
        flush = max(0, (res_keys.shape[2] - self.residual_length) // self.group_size) * self.group_size
        if flush:
            self._push(res_keys[:, :, :flush], res_values[:, :, :flush])
            res_keys, res_values = res_keys[:, :, flush:].clone(), res_values[:, :, flush:].clone()
        self.res_keys, self.res_values = (res_keys, res_values) if res_keys.shape[2] else (None, None)

    def _push(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize whole groups of the oldest residual tokens (``[b, h, k * group_size, d]``) onto the history."""
        key_codes, key_scale, key_zero = quantize_keys(keys, self.nbits, self.group_size, self.scale_dtype,
                                                       backend=self.backend)
        value_codes, value_scale, value_zero = quantize_values(values, self.nbits, self.value_group, self.scale_dtype,
                                                               self.backend)
        if self.key_groups is not None:
            rows = self.key_scale.shape[2]
            new = torch.arange(rows, rows + key_scale.shape[2], device=keys.device, dtype=torch.int32)
            new = new.repeat_interleave(self.group_size)  # [k * group_size]
            if self.key_groups.dim() == 3:
                new = new.expand(*self.key_groups.shape[:2], -1)
            self.key_groups = _cat(self.key_groups, new, dim=-1)
        self.key_codes, self.value_codes = _cat(self.key_codes, key_codes), _cat(self.value_codes, value_codes)
        self.key_scale, self.key_zero = _cat(self.key_scale, key_scale), _cat(self.key_zero, key_zero)
        self.value_scale, self.value_zero = _cat(self.value_scale, value_scale), _cat(self.value_zero, value_zero)

    def _reconstruct(self, *new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """History dequantized into one buffer, followed by the residual and ``new`` (keys, values)."""
        exact_keys = [t for t in (self.res_keys, *new[:1]) if t is not None]
        exact_values = [t for t in (self.res_values, *new[1:]) if t is not None]
        nq = self.quantized_length
        if nq == 0:
            if len(exact_keys) == 1:
                return exact_keys[0], exact_values[0]
            return torch.cat(exact_keys, dim=2), torch.cat(exact_values, dim=2)
        (b, h), d = self.key_codes.shape[:2], self.key_scale.shape[-1]
        total = nq + sum(t.shape[2] for t in exact_keys)
        keys = torch.empty(b, h, total, d, dtype=self.dtype, device=self.key_codes.device)  # [b, h, all, d]
        values = torch.empty_like(keys)
        dequantize_keys(self.key_codes, self.key_scale, self.key_zero, self.nbits, self.group_size,
                        group_map=self.key_groups, dtype=self.dtype, out=keys[:, :, :nq], backend=self.backend)
        dequantize_values(self.value_codes, self.value_scale, self.value_zero, self.nbits, dtype=self.dtype,
                          out=values[:, :, :nq], backend=self.backend)
        at = nq
        for k, v in zip(exact_keys, exact_values):
            keys[:, :, at : at + k.shape[2]], values[:, :, at : at + k.shape[2]] = k, v
            at += k.shape[2]
        return keys, values

    # ------------------------------------------------------------- eviction
    def keep(self, index: torch.Tensor) -> None:
        nq = self.quantized_length
        if index.dim() == 1:
            split = int((index < nq).sum())
            self._keep_history(index[:split])
        else:  # [b, h, m]: heads may keep different numbers of quantized tokens
            counts = (index < nq).sum(dim=-1)
            split = int(counts.max()) if nq else 0
            if nq and int(counts.min()) < split:
                self._keep_ragged(index[..., :split], int(counts.min()))
            else:
                self._keep_history(index[..., :split])
        rest = index[..., split:] - nq
        if self.res_keys is not None:
            self.res_keys, self.res_values = gather_tokens(self.res_keys, rest), gather_tokens(self.res_values, rest)
            if self.res_keys.shape[2] == 0:
                self.res_keys = self.res_values = None

    def _groups(self) -> torch.Tensor:
        """Key scale row of every quantized token: ``[nq]`` or ``[b, h, nq]`` (long)."""
        if self.key_groups is None:
            return torch.arange(self.quantized_length, device=self.key_codes.device) // self.group_size
        return self.key_groups.long()

    def _keep_history(self, index: torch.Tensor) -> None:
        """Keep quantized tokens at ``index`` (``[m]`` or ``[b, h, m]``, all below ``quantized_length``)."""
        nq = self.quantized_length
        if nq == 0 or (index.dim() == 1 and index.numel() == nq):
            return  # sorted and unique: nothing dropped
        if index.shape[-1] == 0:
            return self._drop_history()
        groups = self._groups()  # [nq] or [b, h, nq] -> [m] or [b, h, m]
        self.key_groups = groups[index] if groups.dim() == 1 else gather_tokens(groups.unsqueeze(-1), index)[..., 0]
        self.key_codes, self.value_codes = gather_tokens(self.key_codes, index), gather_tokens(self.value_codes, index)
        self.value_scale, self.value_zero = gather_tokens(self.value_scale, index), gather_tokens(self.value_zero, index)
        self._compact()

    def _keep_ragged(self, index: torch.Tensor, lowest: int) -> None:
        """Per-head ``index`` ``[b, h, split]``: residual tokens in slots ``lowest:`` are quantized now, one key group per head."""
        nq = self.quantized_length
        self._keep_history(index.clamp(max=nq - 1))  # residual slots hold a placeholder for now
        slots = index[..., lowest:]  # [b, h, f]
        fresh = slots >= nq
        taken = (slots - nq).clamp(min=0)
        keys, values = gather_tokens(self.res_keys, taken), gather_tokens(self.res_values, taken)  # [b, h, f, d]
        codes, scale, zero = minmax_quantize(keys, self.nbits, 2, self.scale_dtype, fresh.unsqueeze(-1), self.backend)
        value_codes, value_scale, value_zero = quantize_values(values, self.nbits, self.value_group, self.scale_dtype,
                                                               self.backend)
        fills = (self.key_codes, pack(codes, self.nbits)), (self.value_codes, value_codes), \
            (self.value_scale, value_scale), (self.value_zero, value_zero)
        for held, new in fills:  # held tensors were just gathered: this writes nothing shared
            held[:, :, lowest:] = torch.where(fresh.unsqueeze(-1), new, held[:, :, lowest:])
        groups = self._groups().expand_as(index).clone()
        groups[..., lowest:] = torch.where(fresh, self.key_scale.shape[2], groups[..., lowest:])
        self.key_scale, self.key_zero = _cat(self.key_scale, scale), _cat(self.key_zero, zero)
        self.key_groups = groups
        self._compact()

    def _compact(self) -> None:
        """Drop key scale rows no token points at; store the map compactly (``None``, 1-D or int32)."""
        groups = self.key_groups.long()  # ascending along tokens, in every row and head
        if groups.dim() == 3 and bool((groups == groups[:1, :1]).all()):
            groups = groups[0, 0]  # every row and head keeps the same tokens
        if groups.dim() == 3:  # renumber per head: at most one row per kept token in any head
            first = torch.ones_like(groups, dtype=torch.bool)
            first[..., 1:] = groups[..., 1:] != groups[..., :-1]
            compact = first.long().cumsum(-1) - 1  # [b, h, nq]
            source = groups.new_zeros(*groups.shape[:2], int(compact.max()) + 1).scatter_(2, compact, groups)
            self.key_scale, self.key_zero = gather_tokens(self.key_scale, source), gather_tokens(self.key_zero, source)
            self.key_groups = compact.to(torch.int32)
            return
        used = torch.unique(groups)  # sorted
        if used.numel() < self.key_scale.shape[2]:
            self.key_scale, self.key_zero = self.key_scale.index_select(2, used), self.key_zero.index_select(2, used)
            groups = torch.searchsorted(used, groups)
        nq = groups.shape[-1]
        regular = nq % self.group_size == 0 and nq // self.group_size == used.numel()
        if regular and torch.equal(groups, torch.arange(nq, device=groups.device) // self.group_size):
            self.key_groups = None
        else:
            self.key_groups = groups.to(torch.int32)

    def truncate(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if num_tokens < self.residual:
            kept = self.residual - num_tokens
            self.res_keys, self.res_values = self.res_keys[:, :, :kept].clone(), self.res_values[:, :, :kept].clone()
            return
        remaining = self.quantized_length - (num_tokens - self.residual)
        self.res_keys = self.res_values = None
        if self.key_codes is not None:
            self._keep_history(torch.arange(remaining, device=self.key_codes.device))

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder rows in packed form: codes, scales and the residual move as they are (lossless)."""
        for name in (*self.HISTORY, "res_keys", "res_values"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.dim() > 1:  # a 1-D key_groups is shared by every row
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
