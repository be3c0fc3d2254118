"""A refused forward leaves every layer exactly as before: each layer notes its state before its first change.

Models call ``update`` layer after layer, so a refusal at layer ``k`` (keys of another dtype, values that do not
fit the scales of packed storage, attention scores that never arrived) comes after layers ``0..k-1`` stored the
new tokens and evicted. Each layer therefore records, at the start of its ``update``, what it holds: references
to its store's attributes (stores replace tensors when they append or evict; packed stores write in place only
past what they hold) and, for the decoding slot stores, the few host numbers a step moves. Any exception in an
``update``, or in the forward around it (the model hook of :mod:`hf_kvplus.hooks` reports failed forwards), puts
every recorded layer back. The record is dropped when the forward ends, so it holds references only while one
runs (held tensors a forward replaces stay alive until its end).

A scored slot store's step is undone without a copy per step: the token went into the free slot (dead data),
state the step rewrites went into a spare buffer swapped in by reference (``SlotStore.advance``), and what the
eviction moved (the victim's entry, the protection of the token leaving the recent window, SnapKV's scores
written back in slot order) is put back from what the step itself left in place (``SlotStore.undo_step``,
``slot_undo``). Only the rollback runs those ops, never a step.
"""

from __future__ import annotations

import torch

from ..storage.base import KVStore
from ..storage.ring import RingStore
from ..storage.slots import SlotStore

_LAYER_FIELDS = ("store", "seen", "_pos", "max_held", "_awaiting_attention", "uncommitted", "sinks_displaced",
                 "is_initialized", "record_past")


_PLAIN = frozenset({torch.Tensor, int, float, bool, str, type(None), tuple, torch.dtype, torch.device})


def _store_state(store):
    """What to put back into ``store``: host numbers for the slot stores, its attributes (containers copied) else."""
    if isinstance(store, RingStore):
        return ("ring", store.free, store.head, store.full, store.shift)
    if isinstance(store, SlotStore):
        return ("slots", store.seen, store.full, store.references())
    if store is None:
        return None
    held, nested = dict(vars(store)), {}
    for name, value in held.items():
        kind = type(value)
        if kind is list or kind is dict:
            held[name] = kind(value)
        elif kind not in _PLAIN and isinstance(value, KVStore):  # a prefix store's private store
            nested[name] = _store_state(value)
    return ("attrs", held, nested)


def _restore_attrs(store, state) -> None:
    _, held, nested = state
    vars(store).clear()
    vars(store).update(held)
    for name, inner in nested.items():
        _restore_attrs(held[name], inner)


class Journal:
    """Snapshot and rollback for :class:`~hf_kvplus.eviction.layer.EvictingLayer` (a mixin)."""

    def update(self, key_states, value_states, *args, **kwargs):
        """Append new keys/values; return what attention uses: ``[batch, kv_heads, kept + new, head_dim]``.

        A refusal (or any error) here puts every layer of the cache back as it was before this forward."""
        self.journal_open()
        try:
            out = self._update(key_states, value_states)
        except BaseException:
            roll_back(self.context)
            raise
        self.journal_close()
        return out

    def journal_open(self) -> None:
        """Record this layer's state unless already recorded in this forward (call before any change)."""
        journal = self.context.journal
        if self.layer_idx in journal:  # the layer runs again: a new forward began without the model hook
            journal.clear()
        fields = {name: getattr(self, name) for name in _LAYER_FIELDS}
        fields["_token_state"] = dict(self._token_state)
        fields["_pending_rows"] = list(self._pending_rows)
        journal[self.layer_idx] = (self, fields, _store_state(self.store))

    def journal_close(self) -> None:
        """Drop the record once the last layer updated, unless the model hook will end the forward itself."""
        if not self.context.in_forward and self.layer_idx == self.context.last_layer:
            self.context.journal.clear()

    def journal_restore(self, fields: dict, state) -> None:
        """Put this layer back as recorded."""
        store = fields["store"]
        if state is not None and state[0] == "ring":
            _, free, head, full, shift = state
            if (store.free, store.head, store.full) != (free, head, full):
                store.free, store.head, store.full = free, head, full
                store.cursor.copy_(store.cursor.new_tensor([[free, head]]))
            if store.sink_keys is not None and store.shift != shift:
                store.shift_sinks(*self._rope_angles(shift), shift)
        elif state is not None and state[0] == "slots":
            _, seen, full, references = state
            if store.seen != seen and not store.full:  # the step evicted (written only: the free slot is dead data)
                store.undo_step(seen)
                self.slot_undo(store)
            store.seen, store.full = seen, full
            store.restore_references(references)
        elif state is not None:
            _restore_attrs(store, state)
        for name, value in fields.items():
            setattr(self, name, value)


def roll_back(context) -> None:
    """Put every layer recorded in this forward back (see the module docstring); clears the record."""
    entries, context.journal = list(context.journal.values()), {}
    for layer, fields, state in reversed(entries):
        layer.journal_restore(fields, state)
    context.awaiting = None
