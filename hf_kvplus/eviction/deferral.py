"""Deferred eviction (assisted and speculative decoding): record the past, crop it back, then commit."""

from __future__ import annotations

import torch

from ..storage.ring import RingStore
from ..storage.slots import SlotStore


class Deferral:
    """Past recording and ``crop`` for :class:`~hf_kvplus.eviction.layer.EvictingLayer` (a mixin)."""

    def activate_past_recording(self) -> None:
        """Defer eviction until ``crop`` commits the tokens (assisted and speculative decoding)."""
        if self.uncommitted:  # a new recording starts: what an earlier one left pending is committed first
            self._commit(0)
        if isinstance(self.store, RingStore):
            self._leave_ring()
        if isinstance(self.store, SlotStore):
            self._leave_slots()
        self.record_past = True

    def end_past_recording(self) -> None:
        """Commit what is pending and evict after every forward again (see ``KVPlusCache.end_stale_recording``)."""
        self._check_attention_arrived()
        self._commit(0)
        self.record_past = False

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise the ``ValueError`` :meth:`crop` would raise, changing nothing (the cache checks every layer first)."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove!r}): hf_kvplus caches only accept a negative count of tokens to remove "
                "(or 0 to commit), as DynamicCache does"
            )
        drop = -tokens_to_remove
        if not drop or not self.is_initialized:
            return
        if drop > self.seen:
            raise ValueError(f"crop({tokens_to_remove}): layer {self.layer_idx} has only seen {self.seen} tokens")
        tail = self.pos[..., -drop:] if self.kept >= drop else None
        expected = torch.arange(self.seen - drop, self.seen, device=self.device)
        if tail is None or not bool((tail == expected).all()):
            raise ValueError(
                f"crop({tokens_to_remove}) on layer {self.layer_idx}: some of the newest {drop} tokens were already "
                f"evicted (budget {self.budget}); enable past recording (done by assisted generation) or keep a "
                "recent window at least as long as the tokens you roll back"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (a negative count), then commit any deferred eviction.

        Raises a ``ValueError`` when those tokens were already evicted: the cache cannot roll back.
        """
        self.check_crop(tokens_to_remove)
        drop = -tokens_to_remove
        if drop and isinstance(self.store, RingStore):
            self._leave_ring()
        if drop and isinstance(self.store, SlotStore):
            self._leave_slots()
        if drop and self.is_initialized:
            self.store.truncate(drop)
            self.pos = self.pos[..., :-drop].clone()
            self.token_state = {k: v[..., :-drop].clone() for k, v in self.token_state.items()}
            self.seen -= drop
        self._commit(drop)
