"""Packed int8/int4/int2 storage for any cache layer (KIVI, arXiv 2402.02750): the storage axis.
The newest tokens sit in a full-precision *residual*; once it holds ``residual_length + group_size``
tokens, its oldest ``group_size`` are quantized as one block, never touched again: quantization
costs O(new tokens) per step and errors never compound. Keys are quantized per channel over groups
of tokens, values per token over groups of channels (:mod:`hf_kvplus.quant`). Attention gets the
history dequantized into a scratch buffer shared by the layers of a cache (decoding steps: a few ops,
:mod:`hf_kvplus.storage.packed_step`), then the residual and the new tokens exactly.

Eviction gathers whole-byte token rows (memory is freed); partly evicted key groups keep their
scale row, which tokens find through ``key_groups``. See ``docs/strategies/quantized.md``.
"""

from __future__ import annotations

import torch

from ..quant import (
    check_nbits,
    check_scale_dtype,
    packed_size,
    quantize_keys,
    quantize_values,
)
from ..quant.compiled import check_dequant
from ..quant.fused import DequantScratch
from ..quant.minmax import check_backend
from ..quant.rotation import KeyBasis, check_rotation
from ..rope import layout_of, shift_keys
from ..validate import check_int
from .base import KVStore
from .packed_bits import PackedAccounting
from .packed_keep import PackedEviction
from .packed_step import PackedDecodeStep

DEFAULT_GROUP_SIZE = 64
DEFAULT_RESIDUAL_LENGTH = 128


class QuantizedStore(PackedAccounting, PackedDecodeStep, PackedEviction, KVStore):
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
        scratch (`DequantScratch`, *optional*): shared buffers that enable the decoding hot path.
        key_bits, value_bits (`int`, *optional*): bits of key and value codes (8, 4 or 2), ``nbits`` for each not
            given (keys need more than values: ``key_bits=4, value_bits=2``).
        rotation (`str`, *optional*): ``"hadamard"`` stores keys rotated by an orthonormal Hadamard matrix per head
            before their per-channel quantization and rotates them back when restoring (QuaRot arXiv:2404.00456,
            RotateKV arXiv:2501.16383): outlier channels are spread over all channels. ``head_dim`` must be a power
            of two (:mod:`hf_kvplus.quant.rotation`).
        sinks (`int`, defaults to 0): the first ``sinks`` tokens are held in full precision, never quantized
            (attention sinks, as KVQuant keeps the first token: arXiv:2401.18079). Only for stores that never evict.
        basis (`KeyBasis`, *optional*): the rotation matrix shared by the stores of a cache (made if not given).
        rope (`tuple`, *optional*): ``(inv_freq, attention_scaling, layout)`` of the model
            (:func:`hf_kvplus._compat.rope_parameters`): keys are rotated back to position 0 before they are quantized
            and to their positions when restored (KVQuant's pre-RoPE keys, arXiv:2401.18079), so each channel keeps
            one distribution along the tokens. Positions are the store's token indices: stores that never evict.
        dequant (`str`, defaults to ``"auto"``): how a decoding step restores the history into the scratch:
            ``"eager"`` (a few aten ops, :func:`~hf_kvplus.quant.fused.dequantize_history`), ``"compiled"`` (one
            pass compiled by ``torch.compile``, :mod:`hf_kvplus.quant.compiled`; CPU, falls back to eager with a warning
            where compilation fails) or ``"auto"`` (compiled on CPU once the history holds
            :data:`~hf_kvplus.quant.compiled.AUTO_MIN_TOKENS` tokens, where it pays for its compilation).

    Example:

    ```python
    >>> store = QuantizedStore(nbits=4, group_size=32, residual_length=64)
    >>> store.append(keys, values)  # [batch, kv_heads, tokens, head_dim]
    >>> restored_keys, restored_values = store.get()
    ```
    """

    def __init__(self, nbits=4, group_size=64, residual_length=128, scale_dtype=torch.float16, backend="torch",
                 scratch: DequantScratch | None = None, dequant: str = "auto", key_bits=None, value_bits=None,
                 rotation=None, sinks=0, basis: KeyBasis | None = None, rope=None):
        self.nbits, self.dequant = check_nbits(nbits), check_dequant(dequant)
        self.key_bits = self.nbits if key_bits is None else check_nbits(key_bits, "key_bits")
        self.value_bits = self.nbits if value_bits is None else check_nbits(value_bits, "value_bits")
        self.rotation = check_rotation(rotation)
        self.sinks = check_int("sinks", sinks, minimum=0)
        if self.rotation is not None and backend != "torch":
            raise ValueError(f"rotation={rotation!r} runs on backend='torch' only, got backend={backend!r}")
        # (inv_freq as floats, attention_scaling, layout): keys quantized before RoPE. Plain floats, so the frequencies
        # are no tensor the cache holds (they are tiny, and made into one where a key is quantized or restored).
        self.rope = None if rope is None else (tuple(float(f) for f in torch.as_tensor(rope[0]).tolist()), *rope[1:])
        if rope is not None and backend != "torch":
            raise ValueError(f"keys before RoPE are quantized on backend='torch' only, got backend={backend!r}")
        if basis is None and (self.rotation is not None or rope is not None):
            basis = KeyBasis(self.rope)
        self.basis = basis
        group_size = check_int("group_size", group_size)
        residual_length = check_int("residual_length", residual_length, minimum=0)
        if residual_length % group_size:
            raise ValueError(
                f"residual_length ({residual_length}) must be a multiple of group_size ({group_size}), "
                f"for example {max(group_size, residual_length // group_size * group_size)}"
            )
        self.group_size, self.residual_length = group_size, residual_length
        self.scale_dtype, self.backend = check_scale_dtype(scale_dtype), check_backend(backend)
        self.scratch = scratch  # None: no hot path (eager reconstruction into a new buffer)
        self._drop_history()
        self._res: torch.Tensor | None = None  # [2, b, h, residual_length + group_size, head_dim], model dtype
        self._r = 0  # residual tokens held in `_res`
        self._sink: torch.Tensor | None = None  # [2, b, h, sinks, head_dim], model dtype: the first tokens, exact
        self._s = 0  # sink tokens held
        self._views: tuple | None = None  # (key, views) of the fast path, see `_fast_views`

    HISTORY = ("key_codes", "key_scale", "key_zero", "key_groups", "value_codes", "value_scale", "value_zero")

    def _drop_history(self) -> None:
        # Views of the first tokens (rows) of capacity buffers, or exact tensors until `_adopt_history`.
        self.key_codes = self.value_codes = None  # [b, h, nq, head_dim * key_bits (value_bits) / 8] uint8
        self.key_scale = self.key_zero = None  # [b, h, key groups, head_dim]
        self.key_groups = None  # None: token i is in group i // group_size; else [nq] or [b, h, nq] int32
        self.value_scale = self.value_zero = None  # [b, h, nq, head_dim / value group]
        self._codes = None  # [2, b, h, capacity, head_dim * nbits / 8] uint8: keys, values (equal bits only)
        self._kbuf = self._vbuf = None  # [b, h, capacity, head_dim * bits / 8]: views of `_codes`, or two buffers
        self._key_params = None  # [2, b, h, row capacity, head_dim]: scales, zero points
        self._value_params = None  # [2, b, h, capacity, head_dim / value group]
        self._generation = getattr(self, "_generation", 0) + 1

    quantized_length = property(lambda self: 0 if self.key_codes is None else self.key_codes.shape[2])
    residual = property(lambda self: self._r)
    res_keys = property(lambda self: None if not self._r else self._res[0, :, :, : self._r])  # [b, h, r, d]
    res_values = property(lambda self: None if not self._r else self._res[1, :, :, : self._r])

    @property
    def residual_capacity(self) -> int:
        """Slots of the residual buffer: it flushes when ``residual_length + group_size`` tokens are in it."""
        return self.residual_length + self.group_size

    @property
    def mixed(self) -> bool:
        """Whether keys and values have codes of different widths (two code buffers instead of one)."""
        return self.key_bits != self.value_bits

    @property
    def length(self) -> int:
        return self._s + self.quantized_length + self.residual

    @property
    def sink_keys(self) -> torch.Tensor | None:
        return None if not self._s else self._sink[0, :, :, : self._s]  # [b, h, s, d]

    @property
    def sink_values(self) -> torch.Tensor | None:
        return None if not self._s else self._sink[1, :, :, : self._s]

    def history_tensors(self) -> list[torch.Tensor]:
        """The tensors of the quantized history: codes, scales, zero points and the group map."""
        return [getattr(self, name) for name in self.HISTORY if getattr(self, name) is not None]

    def tensors(self) -> list[torch.Tensor]:
        """History (views of buffers grown by doubling), residual buffer and the shared scratch (once per cache)."""
        codes = (self._codes,) if not self.mixed else (self._kbuf, self._vbuf)
        buffers = (*codes, self._key_params, self._value_params, self.key_groups, self._res, self._sink)
        shared = ([] if self.scratch is None else self.scratch.tensors()) + \
            ([] if self.basis is None else self.basis.tensors())
        return [t for t in buffers if t is not None] + shared

    def split(self, tokens: int) -> tuple[int, int]:
        """``(quantized, residual)`` tokens held after appending ``tokens`` (in any chunks, without eviction), the
        ``sinks`` first tokens apart."""
        tokens = max(0, tokens - self.sinks)
        flush = max(0, (tokens - self.residual_length) // self.group_size) * self.group_size
        return flush, tokens - flush

    def _capacity(self, tokens: int) -> tuple[int, int]:
        """``(token capacity, key row capacity)`` of a history of ``tokens``: whole groups, a power of two of them."""
        rows = 1 << max(0, -(-tokens // self.group_size) - 1).bit_length() if tokens else 0
        return rows * self.group_size, rows

    # ------------------------------------------------------------ append/get
    def update(self, keys, values):
        """Append, returning the held tokens reconstructed and the new ones exactly as given.

        A one-token step without autograd runs the hot path: the token is written into its residual slot,
        the history is restored by :func:`~hf_kvplus.quant.fused.dequantize_history` into the shared scratch,
        and views of the scratch are returned (valid until the next layer's ``update``).
        """
        if keys.shape[2] == 1 and self._fast_ready(keys):
            return self._step(keys, values)
        out = self._reconstruct(keys, values)
        self.append(keys, values)
        return out

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._reconstruct()

    def _start(self, keys: torch.Tensor) -> None:
        self.dtype = keys.dtype
        self.value_group = min(self.group_size, keys.shape[-1])
        if keys.shape[-1] % self.value_group:
            raise ValueError(f"head_dim ({keys.shape[-1]}) must be a multiple of group_size ({self.group_size})")
        for bits in self.bits:
            packed_size(keys.shape[-1], bits)
        b, h, _, d = keys.shape
        check_rotation(self.rotation, d)
        self._res = keys.new_zeros(2, b, h, self.residual_capacity, d)  # [2, b, h, slots, d]
        self._r = 0
        if self.sinks:
            self._sink, self._s = keys.new_zeros(2, b, h, self.sinks, d), 0  # [2, b, h, sinks, d]
        if self.scratch is not None:
            for bits in self.bits:
                self.scratch.prepare(self.residual_capacity, bits, self.dtype, keys.device)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._res is None:
            self._start(keys)
        if self._s < self.sinks:  # the first tokens: held exactly, never quantized
            take = min(self.sinks - self._s, keys.shape[2])
            self._sink[0, :, :, self._s : self._s + take], self._sink[1, :, :, self._s : self._s + take] = \
                keys[:, :, :take], values[:, :, :take]
            self._s += take
            self._views = None
            keys, values = keys[:, :, take:], values[:, :, take:]
            if not keys.shape[2]:
                return
        r, new = self._r, keys.shape[2]
        if r + new < self.residual_capacity:  # fits: written after the held residual (in place)
            self._res[0, :, :, r : r + new], self._res[1, :, :, r : r + new] = keys, values
            self._r = r + new
            return
        res_keys = torch.cat([self._res[0, :, :, :r], keys], dim=2)  # [b, h, r + new, d]
        res_values = torch.cat([self._res[1, :, :, :r], values], dim=2)
        flush = (res_keys.shape[2] - self.residual_length) // self.group_size * self.group_size
        self._push(res_keys[:, :, :flush], res_values[:, :, :flush])
        self._set_residual(res_keys[:, :, flush:], res_values[:, :, flush:])

    def _set_residual(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        """A fresh residual buffer holding ``keys``/``values`` (``[b, h, r, d]``); what was returned stays intact."""
        if self._res is None:
            return
        b, h = (self._res.shape[1:3]) if keys is None else keys.shape[:2]
        res = self._res.new_zeros(2, b, h, self.residual_capacity, self._res.shape[-1])
        self._r = 0 if keys is None else keys.shape[2]
        if self._r:
            res[0, :, :, : self._r], res[1, :, :, : self._r] = keys, values
        self._res = res if self._r or self.scratch is not None else None  # without a hot path, nothing while empty
        self._views = None

    def _push(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize whole groups of the oldest residual tokens (``[b, h, k * group_size, d]``) onto the history."""
        if self.rope is not None:  # back to position 0: history token i is at position sinks + i
            start = self._s + self.quantized_length
            positions = torch.arange(start, start + keys.shape[2], device=keys.device)
            keys = shift_keys(keys, -positions, torch.tensor(self.rope[0], device=keys.device), layout_of(self.rope))
        key_codes, key_scale, key_zero = quantize_keys(self.to_basis(keys), self.key_bits, self.group_size,
                                                       self.scale_dtype, backend=self.backend)
        value_codes, value_scale, value_zero = quantize_values(values, self.value_bits, self.value_group,
                                                               self.scale_dtype, self.backend)
        nq, rows = self.quantized_length, 0 if self.key_scale is None else self.key_scale.shape[2]
        if self.key_groups is not None:
            new = torch.arange(rows, rows + key_scale.shape[2], device=keys.device, dtype=torch.int32)
            new = new.repeat_interleave(self.group_size)  # [k * group_size]
            if self.key_groups.dim() == 3:
                new = new.expand(*self.key_groups.shape[:2], -1)
            self.key_groups = torch.cat([self.key_groups, new], dim=-1)
        tokens, new_rows = nq + keys.shape[2], rows + key_scale.shape[2]
        if self._kbuf is None or tokens > self._kbuf.shape[2] or new_rows > self._key_params.shape[3]:
            self._grow(key_codes, tokens, new_rows)
        self._kbuf[:, :, nq:tokens], self._vbuf[:, :, nq:tokens] = key_codes, value_codes
        self._key_params[0, :, :, rows:new_rows], self._key_params[1, :, :, rows:new_rows] = key_scale, key_zero
        self._value_params[0, :, :, nq:tokens], self._value_params[1, :, :, nq:tokens] = value_scale, value_zero
        self._point(tokens, new_rows)

    def _grow(self, like: torch.Tensor, tokens: int, rows: int, exact: bool = False) -> None:
        """Buffers for ``tokens`` codes and ``rows`` key scale rows (a power of two of groups, or exactly that
        after eviction), old contents kept."""
        b, h, _, _ = like.shape
        capacity, row_capacity = self._capacity(tokens)
        row_capacity = max(row_capacity, 1 << max(0, rows - 1).bit_length())
        if exact or self.scratch is None:  # no hot path: exact sizes, as the history is re-laid out anyway
            capacity, row_capacity = tokens, rows
        d, groups = self.key_scale_width(like), self.value_groups(like)
        nq = self.quantized_length
        old = (self._kbuf, self._key_params, self._value_params, self._vbuf)
        key_width, value_width = packed_size(d, self.key_bits), packed_size(d, self.value_bits)
        if self.mixed:  # [b, h, capacity, d * bits / 8] each
            self._codes = None
            self._kbuf, self._vbuf = like.new_zeros(b, h, capacity, key_width), like.new_zeros(b, h, capacity, value_width)
        else:
            self._codes = like.new_zeros(2, b, h, capacity, key_width)  # [2, b, h, capacity, d * nbits / 8]
            self._kbuf, self._vbuf = self._codes[0], self._codes[1]
        self._key_params = like.new_zeros(2, b, h, row_capacity, d, dtype=self.scale_dtype)
        self._value_params = like.new_zeros(2, b, h, capacity, groups, dtype=self.scale_dtype)
        if old[0] is not None and nq:
            rows_held = self.key_scale.shape[2]
            self._kbuf[:, :, :nq], self._vbuf[:, :, :nq] = old[0][:, :, :nq], old[3][:, :, :nq]
            self._key_params[:, :, :, :rows_held] = old[1][:, :, :, :rows_held]
            self._value_params[:, :, :, :nq] = old[2][:, :, :, :nq]
        if self.scratch is not None and self.scratch.out is not None:  # keep the scratch ahead of the history
            self.scratch.ensure(b, h, d, self.dtype, like.device, capacity + self.residual_capacity + self.sinks,
                                capacity, min(self.bits) < 8)

    def key_scale_width(self, codes: torch.Tensor) -> int:
        """``head_dim`` from packed key codes."""
        return codes.shape[-1] * 8 // self.key_bits

    def value_groups(self, codes: torch.Tensor) -> int:
        return self.key_scale_width(codes) // self.value_group

    def _point(self, tokens: int, rows: int) -> None:
        """Point the public history tensors at the first ``tokens`` (``rows``) of the buffers."""
        self.key_codes, self.value_codes = self._kbuf[:, :, :tokens], self._vbuf[:, :, :tokens]
        self.key_scale, self.key_zero = self._key_params[0, :, :, :rows], self._key_params[1, :, :, :rows]
        self.value_scale, self.value_zero = self._value_params[0, :, :, :tokens], self._value_params[1, :, :, :tokens]
        self._generation += 1
        self._views = None

    def _adopt_history(self) -> None:
        """After eviction, reordering or truncation replaced the history tensors: copy them into fresh buffers."""
        if self.key_codes is None:
            key_groups = self.key_groups
            self._drop_history()
            self.key_groups = key_groups
            return
        held = (self.key_codes, self.value_codes, self.key_scale, self.key_zero, self.value_scale, self.value_zero)
        buffers = (self._kbuf, self._vbuf, self._key_params, self._key_params, self._value_params, self._value_params)
        if all(b is not None and t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
               for t, b in zip(held, buffers)):
            return  # nothing was replaced
        nq, rows = held[0].shape[2], held[2].shape[2]
        self._codes = self._kbuf = self._vbuf = None
        self._grow(held[0], nq, rows, exact=True)  # evicting layers hold a bounded history: no slack
        self._kbuf[:, :, :nq], self._vbuf[:, :, :nq] = held[0], held[1]
        self._key_params[0, :, :, :rows], self._key_params[1, :, :, :rows] = held[2], held[3]
        self._value_params[0, :, :, :nq], self._value_params[1, :, :, :nq] = held[4], held[5]
        self._point(nq, rows)
