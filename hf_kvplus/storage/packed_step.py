"""The decoding step of packed storage: one token into the residual, the history restored into a shared scratch in
one compiled pass (:mod:`~hf_kvplus.quant.compiled`) or a few eager ops (:mod:`~hf_kvplus.quant.fused`)."""

from __future__ import annotations

import torch

from ..quant import (
    compiled,
    dequantize_keys,
    dequantize_values,
)
from ..quant.fused import dequantize_history, int4_planes


class PackedDecodeStep:
    """The hot path of :class:`~hf_kvplus.storage.packed.QuantizedStore` (a mixin)."""

    # ------------------------------------------------------------ hot path
    def _fast_ready(self, keys: torch.Tensor) -> bool:
        """Whether a one-token ``update`` can run :meth:`_step` (host-side checks only)."""
        return (
            self._res is not None
            and self.scratch is not None
            and self.backend == "torch"
            and self.key_groups is None
            and not torch.is_grad_enabled()
            and keys.dtype == self.dtype
            and keys.shape[:2] == self._res.shape[1:3]
        )

    def _slot(self, index: int) -> torch.Tensor:
        """``[1]`` long tensor holding ``index``, made at the first token (a step indexes without creating it)."""
        if self.scratch.slots is None or self.scratch.slots.device != self._res.device:
            self.scratch.prepare(self.residual_capacity, self.nbits, self.dtype, self._res.device)
        return self.scratch.slot_views[index]

    def _fast_views(self) -> tuple:
        """Views of the scratch and the buffers for the current history, made once per flush (not per step)."""
        key = (self.scratch.generation, self._generation, id(self.scratch.out), id(self._res))
        if self._views is not None and self._views[0] == key:
            return self._views[1]
        nq, b, h = self.quantized_length, *self._res.shape[1:3]
        d, k, gs, slots = self._res.shape[-1], 8 // self.nbits, self.group_size, self.residual_capacity
        capacity = self._codes.shape[3]  # the whole history capacity: the scratch grows with it, not per flush
        self.scratch.ensure(b, h, d, self.dtype, self._res.device, capacity + slots, capacity, self.nbits < 8)
        out = self.scratch.restored(b, h, nq + slots, d)  # [2, b, h, nq + slots, d], contiguous
        history = out[:, :, :, :nq]  # [2, b, h, nq, d]
        codes = None if self.nbits == 8 else self.scratch.codes[:, :, :, :nq].view(2, b, h, nq, k, d // k)
        masks, factors = (None, None) if self.nbits == 8 else self.scratch.constants(self.nbits, self.dtype, out.device)
        views = (
            self._codes[:, :, :, :nq].unsqueeze(-2),  # packed [2, b, h, nq, 1, d / k]
            codes,  # [2, b, h, nq, k, d / k] uint8
            history.view(2, b, h, nq, k, d // k),
            out[0, :, :, :nq].view(b, h, nq // gs, gs, d),  # keys [b, h, groups, group, d]
            self.key_scale.unsqueeze(3),  # [b, h, groups, 1, d]
            self.key_zero.unsqueeze(3),
            out[1, :, :, :nq].view(b, h, nq, d // self.value_group, self.value_group),  # values
            self.value_scale.unsqueeze(-1),  # [b, h, nq, value groups, 1]
            self.value_zero.unsqueeze(-1),
            masks,
            factors,
            out[:, :, :, nq:],  # where the residual goes, [2, b, h, slots, d]
            out[0],  # [b, h, nq + slots, d]
            out[1],
            self._res[0],  # [b, h, slots, d]
            self._res[1],
        )
        planes = int4_planes(views[0], codes, views[2]) if self.nbits == 4 else None
        use_compiled = self.backend == "torch" and compiled.wanted(self.dequant, nq, gs, out.device)
        kernel_args = (out[0], out[1], self._codes, self._key_params, self._value_params, self._res) if use_compiled \
            else None
        views = (*views, planes, kernel_args)
        self._views = (key, views)
        self.scratch._users.add(self)
        return views

    def _step(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding token: two writes and one compiled op (or eight eager ones), no host sync, nothing allocated
        that grows with the context."""
        nq, r = self.quantized_length, self._r
        if nq and nq % self.group_size:
            out = self._reconstruct(keys, values)
            self.append(keys, values)
            return out
        slot = self._slot(r)
        if nq == 0:
            res_keys, res_values = self._res[0], self._res[1]
        else:
            views = self._fast_views()
            res_keys, res_values = views[14], views[15]
        res_keys.index_copy_(2, slot, keys)  # [b, h, slots, d]
        res_values.index_copy_(2, slot, values)
        self._r = r = r + 1
        if nq == 0:
            out = res_keys[:, :, :r], res_values[:, :, :r]
        else:
            if views[17] is not None and compiled.unavailable(views[17][0].device) is None:
                compiled.restore_packed(*views[17], self.nbits, self.group_size, self.value_group)  # + residual
            else:
                views[11].copy_(self._res)  # the whole residual buffer, [2, b, h, slots, d]
                dequantize_history(*views[:9], masks=views[9], factors=views[10], planes=views[16])
            out = views[12][:, :, : nq + r], views[13][:, :, : nq + r]  # [b, h, nq + r, d]
        if r == self.residual_capacity:  # flush the oldest group into the history, residual into a fresh buffer
            self._push(self._res[0, :, :, : self.group_size], self._res[1, :, :, : self.group_size])
            self._set_residual(self._res[0, :, :, self.group_size : r], self._res[1, :, :, self.group_size : r])
        return out

    def _reconstruct(self, *new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """History dequantized into one new buffer, followed by the residual and ``new`` (keys, values).

        The eager reference path (and the fallback with autograd, after irregular eviction, for ``quanto``).
        """
        exact_keys = [t for t in (self.res_keys, *new[:1]) if t is not None]
        exact_values = [t for t in (self.res_values, *new[1:]) if t is not None]
        nq = self.quantized_length
        if nq == 0:
            if len(exact_keys) == 1:
                return exact_keys[0], exact_values[0]  # slots before `_r` are never written again
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
