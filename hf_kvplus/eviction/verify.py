"""Exact draft verification (assisted and speculative decoding) for evicting layers.

``generate`` verifies ``k`` draft tokens in one forward, then crops the rejected ones. Plain decoding
would have run them one at a time, evicting after each: draft row ``j`` would only have seen the tokens
kept at its step, and a rejected draft would never have been scored. So the forward is replayed row by
row inside the ``"kvplus"`` attention: the first rows (the prompt, or the last accepted token) attend as
one block, then each draft row attends over exactly the kept set of its step plus itself, its attention
is folded into a copy of the scores and the keep rule runs as it would after that step. The kept set after
every step is remembered; ``crop`` commits the one of the last accepted token, so rejected drafts leave
no trace. ``generate`` tells how many rows are drafts through ``logits_to_keep`` (read by the model hook).
"""

from __future__ import annotations

import torch

from ..attention import attend
from ..rope import shift_keys
from ..storage.base import gather_tokens


class DraftVerification:
    """Row-by-row verification for :class:`~hf_kvplus.eviction.layer.EvictingLayer` (a mixin)."""

    verifying = 0  # rows of the first block of a forward verified row by row (0: not verifying)
    _verified: list | None = None  # (columns, positions, state) kept after the block and after each draft

    def verification_refusal(self) -> str | None:
        """Why this layer's drafts could not be verified exactly as plain decoding runs them (None: they can).

        Read by :meth:`~hf_kvplus.eviction.cache.KVPlusCache.activate_past_recording`, which refuses assisted and
        speculative decoding with this reason before anything changes. Head-wise (adaptive) budgets are masked per
        head only by the plain "kvplus" attention, not by the row-by-row verification."""
        if self.adaptive:
            return "head-wise budgets (budget_allocation='adaptive'), which the row-by-row verification does not mask"
        return None

    def verification_plan(self, new: int) -> int:
        """Rows of the first block when this recorded forward of ``new`` tokens must be verified row by row."""
        drafts = self.context.draft_rows
        if not self.record_past or self.budget is None or not drafts or drafts >= new or self.context.padded:
            return 0
        return new - drafts

    def verify_attention(self, query, key, value, scaling: float | None) -> torch.Tensor:
        """Attention output ``[batch, new, q_heads, value_dim]`` of a verified forward, as sequential steps give it.

        ``query`` ``[batch, q_heads, new, d]``; ``key``/``value`` what ``update`` returned (``[batch, kv_heads,
        held + new, d]``, causal, no padding). Records the kept set after the block and after each draft row.
        """
        self._awaiting_attention = False
        new, block = query.shape[2], self.verifying
        batch, heads, total = key.shape[:3]
        first = total - new + block  # columns the block sees
        output, mass = attend(
            query[:, :, :block],
            key[:, :, :first],
            value[:, :, :first],
            None,
            scaling,
            self.attention_reduction(),
            self.attention_window(),
        )
        outputs = [output]  # [batch, rows, q_heads, dv] blocks
        saved = self._pos, self._token_state, self.seen
        full_pos = self._pos.expand(batch, heads, total)  # [batch, kv_heads, total]
        full_state = self._token_state
        columns = torch.arange(first, device=key.device).expand(batch, heads, first)
        pos = full_pos[..., :first]
        state = {name: value_[..., :first].clone() for name, value_ in full_state.items()}
        snapshots = []
        try:
            for step in range(new - block + 1):
                if step:  # draft row `block + step - 1` over the kept set of its step plus itself
                    column = first + step - 1
                    columns = torch.cat([columns, columns.new_full((batch, heads, 1), column)], dim=-1)
                    pos = torch.cat([pos, full_pos[..., column : column + 1]], dim=-1)
                    state = {
                        name: torch.cat([held, full_state[name][..., column : column + 1]], dim=-1)
                        for name, held in state.items()
                    }
                    row = query[:, :, block + step - 1 : block + step]  # [batch, q_heads, 1, d]
                    output, mass = attend(
                        row,
                        self._step_keys(key, columns, saved[2], saved[2] - new + block + step),
                        gather_tokens(value, columns),
                        None,
                        scaling,
                        "sum",
                    )
                    outputs.append(output)
                self._pos, self._token_state, self.seen = pos, state, saved[2] - new + block + step
                self._arrive(key, block if step == 0 else 1)
                self.on_attention(mass)  # [batch, kv_heads, visible]
                state = self._token_state
                if columns.shape[-1] > self.budget:
                    index = self._select(columns.shape[-1])
                    index = (
                        index.expand(batch, heads, -1) if index.dim() == 1 else index
                    )  # [batch, kv_heads, budget]
                    columns, pos = gather_tokens(columns, index), gather_tokens(pos, index)
                    state = {name: gather_tokens(held, index) for name, held in state.items()}
                snapshots.append((columns, pos, state))
        finally:
            self._pos, self._token_state, self.seen = saved
            self._arrive(key, new)
        self._verified = snapshots
        return torch.cat(outputs, dim=1)

    def _step_keys(self, key: torch.Tensor, columns: torch.Tensor, seen: int, seen_step: int) -> torch.Tensor:
        """Keys at ``columns`` (``[batch, kv_heads, m]``) as plain decoding returns them once ``seen_step`` tokens
        were seen (``update`` returned ``key`` with ``seen`` seen).

        With re-rotation (sinks), ``update`` rotated the key at column ``c`` to slot ``seen - total + c``; plain
        decoding puts the ``i``-th kept key at slot ``seen_step - m + i``: rotate by the difference (RoPE angles add).
        """
        keys = gather_tokens(key, columns)  # [batch, kv_heads, m, head_dim]
        if self.rope is None:
            return keys
        total, m = key.shape[2], columns.shape[-1]
        target = torch.arange(seen_step - m, seen_step, device=key.device)  # [m]
        return shift_keys(keys, target - (seen - total + columns), self.rope[0])

    def _arrive(self, key: torch.Tensor, rows: int) -> None:
        """Tell the strategy a forward of ``rows`` tokens arrived (what its ``initial_state`` sees; SnapKV's decay
        depends on it), on meta tensors: nothing is computed or kept."""
        meta = torch.empty(*key.shape[:2], rows, key.shape[-1], dtype=key.dtype, device="meta")
        self.initial_state(meta, meta)

    def commit_verified(self, dropped: int) -> bool:
        """After ``crop`` dropped ``dropped`` rejected drafts: keep what plain decoding keeps after the last accepted
        token. False when the last forward was not verified row by row (or more than its drafts were dropped)."""
        snapshots, self._verified = self._verified, None
        if snapshots is None or dropped >= len(snapshots):
            return False
        columns, pos, state = snapshots[len(snapshots) - 1 - dropped]
        self._pending_rows = []
        if bool((columns == columns[:1, :1]).all()):  # every row and head keeps the same tokens
            columns, pos = columns[0, 0], pos[0, 0]
        if columns.shape[-1] < self.kept:
            self.store.keep(columns)
            if columns.dim() == 1:  # as _evict: kept sinks now sit away from their original positions
                self.sinks_displaced = self.num_sink_tokens > 0
        self.pos, self.token_state = (
            pos,
            state,
        )  # the scores the accepted rows gave, as plain decoding folds them
        return True
