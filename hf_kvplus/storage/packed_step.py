"""The decoding step of packed storage: one token into the residual, the history restored into a shared scratch in
one compiled pass (:mod:`~hf_kvplus.quant.compiled`) or a few eager ops (:mod:`~hf_kvplus.quant.fused`)."""

from __future__ import annotations

import torch

from ..quant import (
    compiled,
    dequantize_keys,
    dequantize_values,
)
from ..quant.fused import dequantize_history, int4_planes, unpack_codes
from ..rope import layout_of, shift_keys


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
            and self._s == self.sinks
            and not torch.is_grad_enabled()
            and keys.dtype == self.dtype
            and keys.shape[:2] == self._res.shape[1:3]
        )

    def _slot(self, index: int) -> torch.Tensor:
        """``[1]`` long tensor holding ``index``, made at the first token (a step indexes without creating it)."""
        if self.scratch.slots is None or self.scratch.slots.device != self._res.device:
            for bits in self.bits:
                self.scratch.prepare(self.residual_capacity, bits, self.dtype, self._res.device)
        return self.scratch.slot_views[index]

    def _unpacking(self, packed: torch.Tensor, codes, history: torch.Tensor, bits: int, lead: tuple) -> tuple:
        """``(packed, codes, history, masks, factors)`` views of one unpacking (``lead``: the leading dimensions)."""
        nq, d, k = packed.shape[-2], history.shape[-1], 8 // bits
        masks, factors = (None, None) if bits == 8 else self.scratch.constants(bits, self.dtype, history.device)
        return (
            packed.unsqueeze(-2),  # [..., nq, 1, d / k]
            None if bits == 8 else codes.view(*lead, nq, k, d // k),  # uint8 scratch
            history.view(*lead, nq, k, d // k),  # the model dtype
            masks,
            factors,
        )

    def _fast_views(self) -> tuple:
        """Views of the scratch and the buffers for the current history, made once per flush (not per step).

        Scratch layout per row and head: ``[sinks | history | residual slots]``; with a rotation the keys are restored
        in the rotated basis into ``out[0]`` and rotated back into a third plane, which is what a step returns.
        """
        key = (self.scratch.generation, self._generation, id(self.scratch.out), id(self._res))
        if self._views is not None and self._views[0] == key:
            return self._views[1]
        nq, b, h = self.quantized_length, *self._res.shape[1:3]
        d, gs, slots, s = self._res.shape[-1], self.group_size, self.residual_capacity, self.sinks
        capacity = self._kbuf.shape[2]  # the whole history capacity: the scratch grows with it, not per flush
        total = s + nq + slots
        self.scratch.ensure(b, h, d, self.dtype, self._res.device, capacity + slots + s, capacity, min(self.bits) < 8)
        out = self.scratch.restored(b, h, total, d)  # [2, b, h, total, d], contiguous
        history = out[:, :, :, s : s + nq]  # [2, b, h, nq, d]
        turned = self.rotation is not None or self.rope is not None  # keys restored into a third plane
        exact = out if not turned else self.scratch.pair(b, h, total, d)  # (returned keys, values)
        codes = None if self.scratch.codes is None else self.scratch.codes[:, :, :, :nq]  # [2, b, h, nq, d] uint8
        if self.mixed:
            unpacks = (self._unpacking(self._kbuf[:, :, :nq], codes[0], history[0], self.key_bits, (b, h)),
                       self._unpacking(self._vbuf[:, :, :nq], codes[1], history[1], self.value_bits, (b, h)))
        else:
            unpacks = (self._unpacking(self._codes[:, :, :, :nq], codes, history, self.nbits, (2, b, h)),)
        views = (
            *unpacks[0][:3],
            out[0, :, :, s : s + nq].view(b, h, nq // gs, gs, d),  # keys [b, h, groups, group, d]
            self.key_scale.unsqueeze(3),  # [b, h, groups, 1, d]
            self.key_zero.unsqueeze(3),
            out[1, :, :, s : s + nq].view(b, h, nq, d // self.value_group, self.value_group),  # values
            self.value_scale.unsqueeze(-1),  # [b, h, nq, value groups, 1]
            self.value_zero.unsqueeze(-1),
            *unpacks[0][3:],
            exact[:, :, :, s + nq :],  # where the residual goes, [2, b, h, slots, d]
            exact[0],  # the keys returned, [b, h, total, d]
            exact[1],
            self._res[0],  # [b, h, slots, d]
            self._res[1],
        )
        simple = not turned and not self.mixed and not s
        planes = int4_planes(views[0], views[1], views[2]) if self.nbits == 4 and simple else None
        use_compiled = simple and self.backend == "torch" and compiled.wanted(self.dequant, nq, gs, out.device)
        kernel_args = (out[0], out[1], self._codes, self._key_params, self._value_params, self._res) if use_compiled \
            else None
        rotate = None
        if self.rope is not None:  # [k @ H | k @ H R] * [cos | sin], summed: the model's keys at their positions
            wide = self.scratch.wide_view(b * h, nq, 2 * d, self.dtype, out.device, capacity)  # [b * h, nq, 2 * d]
            matrix = self.basis.wide(self.rotation is not None, d, self.dtype, out.device)  # [d, 2 * d]
            rotate = (out[0, :, :, s : s + nq].reshape(b * h, nq, d), matrix.expand(b * h, d, 2 * d), wide,
                      wide.view(b * h, nq, 2, d), self.basis.angles(s, capacity, d, self.dtype, out.device)[:nq],
                      exact[0][:, :, s : s + nq].reshape(b * h, nq, d))
        elif self.rotation is not None:  # history keys [b * h, nq, d] @ H into the returned plane
            rotate = (out[0, :, :, s : s + nq].reshape(b * h, nq, d),
                      self.basis.expanded(b * h, d, self.dtype, out.device),
                      exact[0][:, :, s : s + nq].reshape(b * h, nq, d))
        extra = (unpacks[1:], exact[:, :, :, :s] if s else None, self._sink, rotate)
        views = (*views, planes, kernel_args, extra)
        self._views = (key, views)
        self.scratch._users.add(self)
        return views

    def _step(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding token: two writes and one compiled op (or eight eager ones), no host sync, nothing allocated
        that grows with the context."""
        nq, r, s = self.quantized_length, self._r, self._s
        if (nq and nq % self.group_size) or (s and not nq):
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
                more, sink_out, sinks, rotate = views[18]
                views[11].copy_(self._res)  # the whole residual buffer, [2, b, h, slots, d]
                if sink_out is not None:
                    sink_out.copy_(sinks)  # [2, b, h, sinks, d]
                for part in more:  # values of other bits than keys
                    unpack_codes(*part)
                dequantize_history(*views[:9], masks=views[9], factors=views[10], planes=views[16],
                                   values_addcmul=rotate is not None or self.mixed)
                if rotate is not None:
                    torch.bmm(rotate[0], rotate[1], out=rotate[2])  # [b * h, nq, d]: back to the keys' own basis
                if len(rotate or ()) > 3:  # RoPE at the history's positions
                    rotate[3].mul_(rotate[4])  # [b * h, nq, 2, d] * [nq, 2, d]
                    torch.sum(rotate[3], dim=2, out=rotate[5])  # [b * h, nq, d]
            out = views[12][:, :, : s + nq + r], views[13][:, :, : s + nq + r]  # [b, h, s + nq + r, d]
        if r == self.residual_capacity:  # flush the oldest group into the history, residual into a fresh buffer
            self._push(self._res[0, :, :, : self.group_size], self._res[1, :, :, : self.group_size])
            self._set_residual(self._res[0, :, :, self.group_size : r], self._res[1, :, :, self.group_size : r])
        return out

    def _reconstruct(self, *new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks, the history dequantized, the residual and ``new`` (keys, values), in one new buffer.

        The eager reference path (and the fallback with autograd, after irregular eviction, for ``quanto``).
        """
        exact_keys = [t for t in (self.sink_keys, self.res_keys, *new[:1]) if t is not None]
        exact_values = [t for t in (self.sink_values, self.res_values, *new[1:]) if t is not None]
        nq, s = self.quantized_length, self._s
        if nq == 0:
            if len(exact_keys) == 1:
                return exact_keys[0], exact_values[0]  # slots before `_r` are never written again
            return torch.cat(exact_keys, dim=2), torch.cat(exact_values, dim=2)
        (b, h), d = self.key_codes.shape[:2], self.key_scale.shape[-1]
        total = nq + sum(t.shape[2] for t in exact_keys)
        keys = torch.empty(b, h, total, d, dtype=self.dtype, device=self.key_codes.device)  # [b, h, all, d]
        values = torch.empty_like(keys)
        if s:
            keys[:, :, :s], values[:, :, :s] = exact_keys.pop(0), exact_values.pop(0)
        dequantize_keys(self.key_codes, self.key_scale, self.key_zero, self.key_bits, self.group_size,
                        group_map=self.key_groups, dtype=self.dtype, out=keys[:, :, s : s + nq], backend=self.backend)
        if self.rotation is not None:
            keys[:, :, s : s + nq] = self.from_basis(keys[:, :, s : s + nq])
        if self.rope is not None:  # back to their positions, s..s+nq-1
            positions = torch.arange(s, s + nq, device=keys.device)
            keys[:, :, s : s + nq] = shift_keys(keys[:, :, s : s + nq], positions, torch.tensor(self.rope[0], device=keys.device),
                                                  layout_of(self.rope))
        dequantize_values(self.value_codes, self.value_scale, self.value_zero, self.value_bits, dtype=self.dtype,
                          out=values[:, :, s : s + nq], backend=self.backend)
        at = s + nq
        for k, v in zip(exact_keys, exact_values):
            keys[:, :, at : at + k.shape[2]], values[:, :, at : at + k.shape[2]] = k, v
            at += k.shape[2]
        return keys, values
