"""Eviction, truncation and batch selection over packed storage, group by group."""

from __future__ import annotations

import torch

from ..quant import (
    minmax_quantize,
    pack,
    quantize_values,
)
from .base import KVStore, gather_tokens
from .packed_rows import RowAlignedStore


class PackedEviction:
    """What :class:`~hf_kvplus.storage.packed.QuantizedStore` does when tokens or rows go (a mixin)."""

    def for_padding(self, pad: list[int], seen: int) -> KVStore:
        """A left-padded batch, while nothing is held: one store per row, over its real tokens only, so key groups
        start at each row's first real token and padding never enters a group's range (see ``packed_rows``)."""
        if self.length or not any(pad):
            return self
        settings = dict(nbits=self.nbits, group_size=self.group_size, residual_length=self.residual_length,
                        scale_dtype=self.scale_dtype, backend=self.backend, key_bits=self.key_bits,
                        value_bits=self.value_bits, rotation=self.rotation, sinks=self.sinks, basis=self.basis)
        return RowAlignedStore(lambda: type(self)(**settings), [max(0, p - seen) for p in pad])

    # ------------------------------------------------------------- eviction
    def keep(self, index: torch.Tensor) -> None:
        if self._s:  # sinks: only stores that never evict hold them, so only a beam or batch op keeps them all
            sinks = index[..., : self._s]
            if index.shape[-1] < self._s or not bool((sinks == torch.arange(self._s, device=index.device)).all()):
                raise ValueError(f"a store with sinks={self.sinks} keeps its first tokens: eviction must keep them")
            index = index[..., self._s :] - self._s
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
        if self._r:
            res_keys, res_values = gather_tokens(self.res_keys, rest), gather_tokens(self.res_values, rest)
            self._set_residual(res_keys, res_values)
        self._adopt_history()

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
        codes, scale, zero = minmax_quantize(self.to_basis(keys), self.key_bits, 2, self.scale_dtype,
                                             fresh.unsqueeze(-1), self.backend)
        value_codes, value_scale, value_zero = quantize_values(values, self.value_bits, self.value_group,
                                                               self.scale_dtype, self.backend)
        fills = (self.key_codes, pack(codes, self.key_bits)), (self.value_codes, value_codes), \
            (self.value_scale, value_scale), (self.value_zero, value_zero)
        for held, new in fills:  # held tensors were just gathered: this writes nothing shared
            held[:, :, lowest:] = torch.where(fresh.unsqueeze(-1), new, held[:, :, lowest:])
        groups = self._groups().expand_as(index).clone()
        groups[..., lowest:] = torch.where(fresh, self.key_scale.shape[2], groups[..., lowest:])
        self.key_scale = torch.cat([self.key_scale, scale], dim=2)
        self.key_zero = torch.cat([self.key_zero, zero], dim=2)
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
        if num_tokens > self.quantized_length + self.residual and self._s:  # into the sinks: drop all after them
            self._s -= min(self._s, num_tokens - self.quantized_length - self.residual)
            num_tokens = self.quantized_length + self.residual
            self._views = None
        if num_tokens < self.residual:
            self._r -= num_tokens  # the dropped slots are overwritten by the next tokens
            self._views = None
            return
        remaining = self.quantized_length - (num_tokens - self.residual)
        self._set_residual(None, None)
        if self.key_codes is not None:
            self._keep_history(torch.arange(remaining, device=self.key_codes.device))
            self._adopt_history()

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder rows in packed form: codes, scales and the residual move as they are (lossless)."""
        for name in self.HISTORY:
            tensor = getattr(self, name)
            if tensor is not None and tensor.dim() > 1:  # a 1-D key_groups is shared by every row
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        if self._sink is not None:
            self._sink = self._sink.index_select(1, index.to(self._sink.device))  # [2, b', h, sinks, d]
        if self._res is not None:
            res = self._res.index_select(1, index.to(self._res.device))  # [2, b', h, slots, d]
            self._set_residual(res[0, :, :, : self._r], res[1, :, :, : self._r])
        self._adopt_history()
