"""The hooks a policy overrides: scores, attention reduction, per-token state, slot-storage scoring."""

from __future__ import annotations

import torch

from ..storage.slots import SlotStore


class StrategyHooks:
    """Defaults of every hook of :class:`~hf_kvplus.eviction.layer.EvictingLayer` (a mixin; recency eviction)."""

    # -------------------------------------------------------------- strategy
    def score(self) -> torch.Tensor | None:
        """Hook: importance of each kept token, ``[batch, kv_heads, kept]``; higher is kept.

        ``None`` (the default) keeps the newest tokens, after the protected ones. Among equal scores
        the older token is evicted first.
        """
        return None

    def attention_reduction(self) -> str:
        """How the attention mass is reduced over queries before :meth:`on_attention` (``"sum"`` or ``"last"``)."""
        return "sum"

    def attention_window(self) -> int | None:
        """How many of a forward's last queries count (``None``: all of them; SnapKV uses a window)."""
        return None

    def requested_reduction(self) -> str:
        """What the attention function must compute: every query row while eviction is deferred."""
        return "rows" if self.record_past else self.attention_reduction()

    def on_attention(self, mass: torch.Tensor) -> None:
        """Hook for scorers that need attention: ``mass`` is ``[batch, kv_heads, kept]`` (float32)."""

    def slot_score(self, slots: SlotStore) -> tuple[str, int] | None:
        """Hook for slot storage: bring the scores of every slot up to date in place, return where they are.

        Returns ``(name, direction)``: the state (or ``"score"``) holding the scores, ``[batch, rows, slots]``
        float32 of one sign for every candidate, and ``1`` when a larger magnitude means a higher score
        (``-1`` otherwise). A strategy that does not override it decodes in position order (no slot storage).
        """
        return None

    def slot_evict(self, slots: SlotStore) -> None:
        """Hook for slot storage: free one slot per row (and head) after a step. By default the token leaving the
        recent window starts competing and the lowest :meth:`slot_score` goes (the older on ties)."""
        slots.release()
        slots.evict(*self.slot_score(slots))

    def enter_slots(self, slots: SlotStore) -> None:
        """Hook for slot storage: make the strategy's own buffers (in ``slots.extra``, counted as held)."""

    def slot_extra_nbytes(self, batch: int, kv_heads: int, capacity: int) -> int:
        """Bytes of the buffers :meth:`enter_slots` makes (for ``predict_nbytes``)."""
        return 0

    def arrival_state(self, key_states: torch.Tensor, value_states: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """Hook for slot storage: state of a token written by a decoding step, ``{name: number or [batch, kv_heads, 1]}``."""
        return self.initial_state(key_states, value_states)

    def slot_attention(self, slots: SlotStore, probs: torch.Tensor) -> None:
        """Hook for slot storage: fold a step's probabilities (``[batch * kv_heads, groups, slots]``) into the state.

        State the step rewrites must be named in :attr:`slot_stepped` and written into ``slots.spare_rows3[name]``
        followed by ``slots.advance(name)``, never in place: a refused forward then puts it back exactly."""

    #: State a slot step rewrites as a whole (see :meth:`slot_attention`); each holds a spare buffer.
    slot_stepped: tuple[str, ...] = ()

    def slot_undo(self, slots: SlotStore) -> None:
        """Hook for slot storage: undo what a step that evicted changed in the strategy's own buffers, besides
        :attr:`slot_stepped` (a refused forward only; SnapKV writes its scores back in slot order)."""

    def initial_state(self, key_states: torch.Tensor, value_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hook: per-token state of newly appended tokens, ``{name: [batch, kv_heads, new]}``.

        The default gives zeros for every existing entry of ``token_state``. A strategy returns new
        names here to create them (for example an accumulator, or a score computed from the keys).
        """
        shape = (*key_states.shape[:2], key_states.shape[-2])
        return {name: state.new_zeros(shape) for name, state in self.token_state.items()}

    def _extend_state(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, state in self.initial_state(key_states, value_states).items():
            held = self.token_state.get(name)
            self.token_state[name] = state if held is None else torch.cat([held, state], dim=-1)
