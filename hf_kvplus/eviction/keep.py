"""The keep rule: fold the attention a forward produced, choose what stays, re-rotate displaced keys."""

from __future__ import annotations

import math

import torch

from ..rope import layout_of, shift_keys
from ..storage.base import gather_tokens
from ..storage.slots import SlotStore


class KeepRule:
    """Eviction for :class:`~hf_kvplus.eviction.layer.EvictingLayer` (a mixin)."""

    # --------------------------------------------------------------- eviction
    def observe_attention(self, mass: torch.Tensor, reduction: str) -> None:
        """Receive the attention computed over what ``update`` returned (from the "kvplus" attention)."""
        self._awaiting_attention = False
        self.head_mask = None  # used by this forward's attention only
        if isinstance(self.store, SlotStore):
            raise RuntimeError("a layer in slot storage takes its attention through observe_slot_probs()")
        if self.record_past:
            self._pending_rows.append(mass if reduction == "rows" else mass.unsqueeze(2))
            return
        self.on_attention(mass)
        self._evict()

    def _check_attention_arrived(self) -> None:
        if self._awaiting_attention:
            raise RuntimeError(
                f"{type(self).__name__} (layer {self.layer_idx}) received no attention scores: the model did not run "
                "the scoring attention. Build the cache with hf_kvplus.make_cache(name, model, ...) or call "
                "hf_kvplus.attach(model) once, and call the model itself (model(...), generate), not model.forward."
            )

    def _commit(self, dropped: int) -> None:
        """Fold attention recorded while eviction was deferred (minus ``dropped`` rejected queries), then evict."""
        self.uncommitted = False
        self._forward_new = None  # several tokens since the last eviction (adaptive budgets reallocate)
        if self.commit_verified(dropped):
            return self._evict()
        rows, self._pending_rows = self._pending_rows, []
        trimmed = []
        for block in reversed(rows):
            cut = min(dropped, block.shape[2])
            dropped -= cut
            if block.shape[2] > cut:
                trimmed.append(block[:, :, : block.shape[2] - cut])
        for block in reversed(trimmed):
            block = block[..., : self.kept]
            if block.shape[-1] < self.kept:
                block = torch.nn.functional.pad(block, (0, self.kept - block.shape[-1]))
            self.on_attention(block[:, :, -1] if self.attention_reduction() == "last" else block.sum(dim=2))
        self._evict()

    def _evict(self) -> None:
        kept = self.kept
        if self.adaptive and self.budget is not None and self.seen > self.budget:
            self._evict_adaptive(kept)
        elif self.budget is not None and kept > self.budget:
            self._require_known_padding()
            index = self._select(kept)
            self.store.keep(index)
            if index.dim() == 3:
                self.pos = gather_tokens(self.pos.expand(self.batch_size, self.num_heads, kept), index)
            else:
                self.pos = self.pos.index_select(-1, index)
                self.sinks_displaced = self.num_sink_tokens > 0
            self.token_state = {k: gather_tokens(v, index) for k, v in self.token_state.items()}
        self.max_held = max(self.max_held, self.kept)
        if self._ring_eligible():
            self._enter_ring()
        elif self._slot_eligible():
            self._enter_slots()

    # ------------------------------------------------------ adaptive budgets
    def _evict_adaptive(self, kept: int) -> None:
        """AdaKV eviction (arXiv:2407.11550): the layer keeps ``budget * kv_heads`` tokens per row, split across heads
        by score. Heads hold different counts in rows as long as the fullest one, unused entries first (position
        ``-1``, masked per head by the "kvplus" attention). A forward of several tokens reallocates (one host read:
        the new row length); a one-token step keeps each head's count (one argmin per head, no host read)."""
        self._require_known_padding()
        if self._forward_new == 1:
            index, unused = self._select_adaptive_step(kept), None
        else:
            index, unused = self._select_adaptive(kept)
        self.store.keep(index)
        pos = gather_tokens(self.pos.expand(self.batch_size, self.num_heads, kept), index)
        self.pos = pos if unused is None else pos.masked_fill(unused, -1)
        self.token_state = {k: gather_tokens(v, index) for k, v in self.token_state.items()}

    def _adaptive_priority(self, kept: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores with the protected tokens at ``+inf``, the real-token mask and positions, ``[batch, kv_heads, kept]``."""
        scores = self.score()
        pos = self.pos.expand(self.batch_size, self.num_heads, kept)
        lower = self.context.pad_len.to(self.device).view(-1, 1, 1) if self.context.padded else 0
        real = pos >= lower  # neither left padding nor an unused entry of a head
        rank = real.long().cumsum(dim=-1)  # 1-based rank among real tokens, oldest first
        protect = real & (rank <= self.num_sink_tokens)
        if self.recent_window:
            protect |= real & (rank > rank[..., -1:] - self.recent_window)
        if scores is None:
            scores = pos.float()
        return scores.float().masked_fill(protect, math.inf), real, pos

    def _select_adaptive_step(self, kept: int) -> torch.Tensor:
        """One entry too many in every head (a one-token step): ``[batch, kv_heads, kept - 1]``, each head's count kept.

        In a row over its ``budget * kv_heads`` real tokens each head drops left padding first, else its lowest
        candidate (ties: the older); unused entries stay. A row under it (left padding held it back) drops an unused
        entry or padding, so it keeps what the row alone would."""
        priority, real, pos = self._adaptive_priority(kept)
        unused = pos < 0
        over = real.sum(dim=(1, 2), keepdim=True) > self.num_heads * self.budget  # [batch, 1, 1]
        priority = priority.masked_fill(~real & ~unused, -math.inf)  # left padding goes first
        priority = torch.where(unused, torch.where(over, math.inf, -math.inf), priority)
        worst = priority.argmin(dim=-1, keepdim=True)  # [batch, kv_heads, 1]; ties: the first (older)
        slots = torch.arange(kept - 1, device=self.device)
        return slots + (slots >= worst)

    def _select_adaptive(self, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept entries ``[batch, kv_heads, length]`` in position order (unused first) and which are unused.

        Every head keeps its protected tokens and ``head_floor`` of the heavy budget by its own ranking (AdaKV's
        safeguard); the rest of the layer's ``budget * kv_heads`` goes to the highest scores pooled over heads."""
        batch, heads = self.batch_size, self.num_heads
        priority, real, _ = self._adaptive_priority(kept)
        priority = priority.masked_fill(~real, -math.inf)
        protected = min(self.num_sink_tokens + self.recent_window, self.budget)
        floor = min(kept, protected + round(self.head_floor * (self.budget - protected)))
        order = priority.sort(dim=-1, stable=True).indices  # ascending; among ties the older first
        guaranteed = torch.zeros_like(real).scatter_(-1, order[..., kept - floor :], True) & real
        pooled = priority.masked_fill(guaranteed, math.inf).view(batch, heads * kept)  # [batch, kv_heads * kept]
        total = min(heads * self.budget, heads * kept)
        top = pooled.topk(total, dim=-1, sorted=False).indices
        chosen = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, top, True).view(batch, heads, kept) & real
        length = max(1, int(chosen.sum(dim=-1).max()))  # host read: the new row length (reallocation only)
        columns = torch.arange(kept, device=self.device).expand(batch, heads, kept)
        index = torch.where(chosen, columns, -1).sort(dim=-1).values[..., kept - length :]  # unused (-1) first
        unused = index < 0
        return index.clamp(min=0), unused

    def head_lengths(self) -> torch.Tensor:
        """Real tokens each head holds, ``[batch, kv_heads]`` int64 (all equal unless budgets are adaptive)."""
        pos = self.pos.expand(self.batch_size, self.num_heads, self.kept)
        return (pos >= 0).sum(dim=-1)

    def _require_known_padding(self) -> None:
        if self.batch_size > 1 and not self.context.observed:
            raise ValueError(
                f"{type(self).__name__} would evict tokens from a batch of {self.batch_size} rows without knowing their "
                "padding. Create the cache with hf_kvplus.make_cache(name, model, ...) or call hf_kvplus.attach(model) "
                "once, so padding is never kept in place of real tokens."
            )

    def _select(self, kept: int) -> torch.Tensor:
        """Indices of the tokens to keep: 1-D when shared by all rows and heads, else ``[batch, kv_heads, budget]``."""
        budget = self.budget
        scores = self.score()
        pad_len = self.context.pad_len
        padded = self.context.padded
        if scores is None and not padded and self.pos.dim() == 1:
            sinks = min(self.num_sink_tokens, budget)
            return torch.cat(
                [
                    torch.arange(sinks, device=self.device),
                    torch.arange(kept - (budget - sinks), kept, device=self.device),
                ]
            )
        if scores is not None and not self.per_head:
            scores = scores.float().mean(dim=1, keepdim=True).expand(-1, self.num_heads, -1)
        if scores is not None and not padded:
            return self._select_by_score(scores, kept)
        pos = self.pos.expand(self.batch_size, self.num_heads, kept)
        if padded:
            valid = pos >= pad_len.to(self.device).view(-1, 1, 1)
        else:
            valid = torch.ones_like(pos, dtype=torch.bool)
        rank = valid.long().cumsum(dim=-1)  # 1-based rank among real tokens, oldest first
        num_valid = rank[..., -1:]
        protect = valid & (rank <= self.num_sink_tokens)
        if self.recent_window:
            protect |= valid & (rank > num_valid - self.recent_window)
        priority = pos.float() if scores is None else scores.float().clone()
        priority = priority.masked_fill(protect, math.inf).masked_fill(~valid, -math.inf)
        # Ascending and stable: among equal scores the older token goes first, as in `_select_by_score`.
        return priority.sort(dim=-1, stable=True).indices[..., kept - budget :].sort(dim=-1).values

    def _select_by_score(self, scores: torch.Tensor, kept: int) -> torch.Tensor:
        """The keep rule without padding, where it reduces to slicing (the common, per-step path).

        Kept slots are sorted by position, so the sinks are the first columns and the recent window
        the last ones; only the columns between them compete by score. ``scores``: ``[batch, kv_heads, kept]``.
        """
        budget = self.budget
        sinks = min(self.num_sink_tokens, budget)
        recent = min(self.recent_window, budget - sinks)
        middle = scores[..., sinks : kept - recent]  # [batch, kv_heads, candidates]
        slots = torch.arange(budget, device=self.device)
        if kept - budget == 1:  # one token too many (a decoding step): skip the lowest, shift the rest
            worst = middle.argmin(dim=-1, keepdim=True) + sinks  # [batch, kv_heads, 1]; ties: the oldest
            return slots + (slots >= worst)
        order = middle.sort(dim=-1, stable=True).indices  # ascending; among ties the older token first
        chosen = order[..., kept - budget :].sort(dim=-1).values + sinks
        shape = (*scores.shape[:2], -1)
        return torch.cat(
            [slots[:sinks].expand(shape), chosen, torch.arange(kept - recent, kept, device=self.device).expand(shape)],
            dim=-1,
        )

    # ------------------------------------------------------------- positions
    def _shift_to_slots(self, keys: torch.Tensor) -> torch.Tensor:
        """Rotate keys whose slot position differs from their original one (the sinks, usually).

        Kept keys are treated as contiguous positions ending at the present. With shared (1-D) positions
        only the sinks can be displaced, all by the same host-known shift; with per-row positions
        (padding) every key is rotated by its own shift, zero for most (a rotation by zero is exact).
        """
        length = keys.shape[-2]
        if self.pos.dim() == 1:
            sinks = min(self.num_sink_tokens, self.budget or length, length)
            if not self.sinks_displaced or not sinks:
                return keys
            shift = torch.full((sinks,), self.seen - length, device=self.device)  # [sinks]; pos of sink i is i
            shifted = shift_keys(keys[:, :, :sinks], shift, self.rope[0], layout_of(self.rope))
            return torch.cat([shifted, keys[:, :, sinks:]], dim=-2)
        slots = torch.arange(self.seen - length, self.seen, device=self.device)
        return shift_keys(keys, slots - self.pos, self.rope[0], layout_of(self.rope))  # [batch, kv_heads, n] shifts
