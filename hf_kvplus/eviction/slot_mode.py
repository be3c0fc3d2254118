"""Slot storage for a full layer: entering it, one decoding step in it, and leaving it for position order.

Recency layers (sink, window) use a :class:`~hf_kvplus.storage.ring.RingStore`; scored layers a
:class:`~hf_kvplus.storage.slots.SlotStore`. ``EvictingLayer`` inherits these methods."""

from __future__ import annotations

import torch

from ..attention import request_attention
from ..rope import layout_of
from ..storage.base import DenseStore
from ..storage.ring import RingStore, RopeAngles
from ..storage.slots import POSITION_LIMIT, SlotStore
from .strategy import StrategyHooks


class SlotMode:
    """The slot-storage methods of :class:`~hf_kvplus.eviction.layer.EvictingLayer` (a mixin)."""

    # ------------------------------------------------------------ slot storage
    def uses_slots(self) -> bool:
        """Whether this layer decodes in slot storage once full: recency eviction (no scores, attention or
        per-token state) over dense storage. ``predict_nbytes`` and the decoding path both ask this."""
        return (
            self.budget is not None
            and type(self).score is StrategyHooks.score
            and type(self).initial_state is StrategyHooks.initial_state
            and not self.needs_attention
            and self.store_factory is DenseStore
        )

    def _ring_eligible(self) -> bool:
        """A full slot-storage layer, unpadded, evicting after every forward, autograd off: enter slot storage."""
        return (
            self.uses_slots()
            and self.kept == self.budget < self.seen  # full, and evicting from now on
            and type(self.store) is DenseStore
            and not self.record_past
            and self._pos.dim() == 1
            and not self.context.padded
            and not torch.is_grad_enabled()  # in-place slot writes would break a backward through the cache
        )

    def _enter_ring(self) -> None:
        keys, values = self.store.get()  # [batch, kv_heads, budget, head_dim], position order
        sinks = min(self.num_sink_tokens, self.budget)
        rotary_dim = None if self.rope is None else 2 * self.rope[0].shape[-1]
        self.store = RingStore(keys, values, sinks, rotary_dim, None if self.rope is None else layout_of(self.rope))
        self._pos = None
        if self.store.sink_keys is not None:
            self._rope_angles(self.seen + 1 - self.store.capacity)  # the next step's angles: always held in slot mode

    def _leave_ring(self) -> None:
        """Back to a dense store in position order (before anything but a one-token step)."""
        ring = self.store
        self.context.rope_memo = None
        self._pos = ring.positions(self.seen, self.device)
        keys, values = ring.get()
        self.store = self.store_factory()
        self.store.append(keys, values)
        self.sinks_displaced = ring.sinks > 0 and self.seen > ring.length

    def _ring_step(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A decoding step in slot storage: write, re-rotate the sinks if they moved, return the buffers, evict."""
        ring = self.store
        self.seen += 1
        ring.write(key_states, value_states)
        if ring.sink_keys is not None:
            shift = self.seen - ring.capacity  # the sinks sit just before the window, which ends at the present
            if shift != ring.shift:
                ring.shift_sinks(*self._rope_angles(shift), shift)
        keys, values = ring.keys, ring.values  # [batch, kv_heads, budget + 1, head_dim]
        ring.evict_oldest()
        self.max_held = max(self.max_held, self.kept)
        return keys, values

    # ------------------------------------------------------- scored slot storage
    def uses_score_slots(self) -> bool:
        """Whether this layer decodes in scored slot storage once full (a strategy with ``slot_score``, dense storage)."""
        return (
            self.budget is not None
            and type(self).slot_score is not StrategyHooks.slot_score
            and self.store_factory is DenseStore
            and not self.adaptive  # head-wise budgets decode in the dense path (KeepRule._select_adaptive_step)
        )

    def _slot_steady(self) -> bool:
        """One more decoding step can run in slot storage: no padding, no deferral, autograd off, positions in range."""
        return (
            not self.record_past
            and not self.context.padded
            and not torch.is_grad_enabled()
            and self.seen + 1 < POSITION_LIMIT
        )

    def _slot_eligible(self) -> bool:
        return (
            self.uses_score_slots()
            and self.kept == self.budget < self.seen
            and type(self.store) is DenseStore
            and self._slot_steady()
        )

    def _enter_slots(self) -> None:
        keys, values = self.store.get()  # [batch, kv_heads, budget, head_dim], position order
        sinks = min(self.num_sink_tokens, self.budget)
        recent = min(self.recent_window, self.budget - sinks)
        self.store = SlotStore(keys, values, self._pos, self._token_state, sinks, recent, not self.per_head, self.seen,
                               protect=self.slot_protects, stepped=self.slot_stepped)
        self._pos, self._token_state = None, {}
        if self.needs_attention:  # what the first step's attention needs, made now (predict_nbytes counts them)
            self.store.ones(self.query_groups)
            self.store.output_buffer(self.num_heads * self.query_groups, values.shape[-1])
        self.enter_slots(self.store)

    def _leave_slots(self) -> None:
        """Back to a dense store in position order (before anything but a steady one-token step)."""
        slots = self.store
        order = slots.order()  # [batch, rows, kept]
        keys, values = slots.get(order)
        self._pos = slots.positions(order)  # [batch, kv_heads, kept]
        self._token_state = slots.ordered_state(order)
        self.store = self.store_factory()
        self.store.append(keys, values)

    def _slot_step(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A decoding step in slot storage: write the token and its state, return every slot, evict (now or
        once attention reported)."""
        slots = self.store
        position = self.seen
        slots.write(key_states, value_states, position)
        for name, value in self.arrival_state(key_states, value_states).items():
            slots.write_state(name, value, position)
        self.seen += 1
        keys, values = slots.keys, slots.values  # [batch, kv_heads, budget + 1, head_dim]
        if self.needs_attention:
            self._awaiting_attention = True
            self.context.awaiting = self
            request_attention(self.layer_idx, self)
        else:
            self._slot_evict()
        return keys, values

    def _slot_evict(self) -> None:
        self.slot_evict(self.store)
        self.store.full = False
        self.max_held = max(self.max_held, self.kept)

    def observe_slot_probs(self, probs: torch.Tensor) -> None:
        """Receive a decoding step's attention probabilities over every slot, ``[batch * kv_heads, groups, slots]``
        float32 (query heads of a KV head in its group), then evict."""
        self._awaiting_attention = False
        self.slot_attention(self.store, probs)
        self._slot_evict()

    def slot_mean(self, slots: SlotStore, values: torch.Tensor) -> str:
        """The name of the scores to rank by: ``values`` itself per head, else its mean over heads in ``slots.score``."""
        if self.per_head:
            for name, state in slots.state.items():
                if state is values:
                    return name
            slots.score.copy_(values)
            return "score"
        torch.mean(values, dim=1, keepdim=True, out=slots.score)  # [batch, 1, slots]
        slots.score.abs_()  # a mean of -0.0 is +0.0: magnitudes keep one sign (the direction says which way)
        return "score"

    def _rope_angles(self, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.context.rope_memo
        if angles is None or angles.device != self.device:
            angles = self.context.rope_memo = RopeAngles(self.rope[0], self.head_dim, self.device, layout_of(self.rope))
        return angles.at(shift)
