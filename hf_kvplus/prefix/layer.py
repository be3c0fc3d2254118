"""The layer-level parts of the prefix-shared cache: token ids, references, and the layer itself.

:class:`PrefixLayer` is an :class:`~hf_kvplus.eviction.layer.EvictingLayer` that never evicts (budget
``None``) over a :class:`~hf_kvplus.storage.shared.SharedPrefixStore`, so beam reordering, batch
selection and repetition, ``crop`` and memory accounting are the base's. A :class:`PrefixLease` holds
the request's reference on the store's tree until it is released or garbage-collected.
"""

from __future__ import annotations

import weakref

import torch

from ..eviction.context import CacheContext
from ..eviction.layer import EvictingLayer
from ..storage.shared import SharedPrefixStore
from .pool import PrefixPool


class PrefixLease:
    """One reference on a store node (and its ancestors), given back on ``release`` or garbage collection."""

    def __init__(self, store: PrefixPool | None = None, node_id: int | None = None):
        self.node_id = node_id
        self._finalizer = None if node_id is None else weakref.finalize(self, store.release, node_id)

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __deepcopy__(self, memo) -> PrefixLease:
        return PrefixLease()  # a deep copy owns copies of the tensors: it pins no node


class PrefixContext(CacheContext):
    """Padding plus the token id of every column (``[batch, seen]``, CPU), learnt through :func:`hf_kvplus.attach`."""

    _PADDING_FIELDS = (*CacheContext._PADDING_FIELDS, "token_ids", "ids_known")  # put back after a failed forward

    def __init__(self) -> None:
        super().__init__()
        self.token_ids: torch.Tensor | None = None
        self.ids_known = True  # False once a forward came without input_ids: nothing more is published

    def select_batch(self, index: torch.Tensor) -> None:
        super().select_batch(index)
        if self.token_ids is not None:
            self.token_ids = self.token_ids.index_select(0, index.cpu())

    def reset(self) -> None:
        super().reset()
        self.token_ids, self.ids_known = None, True


class PrefixLayer(EvictingLayer):
    """A layer that never evicts, over a :class:`SharedPrefixStore`. Positions are implicit (``0..seen-1``)."""

    implicit_positions = True
    split_attention = True  # hf_kvplus.attach switches the model to the "kvplus" attention, which reads the parts

    @property
    def pos(self) -> torch.Tensor | None:
        return None if self.store is None else torch.arange(self.seen, device=self.device)

    @pos.setter
    def pos(self, value) -> None:  # the base assigns positions; a non-evicting layer needs no table
        pass

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.store = SharedPrefixStore(self.layer_idx, [], self.store_factory, self.batch_size)

    def adopt(self, segments: list, batch_size: int) -> None:
        """Start from a shared prefix (an empty layer only)."""
        keys = segments[0][0][self.layer_idx].get()[0]  # [1, kv_heads, n, head_dim]
        self.dtype, self.device, self.batch_size = keys.dtype, keys.device, batch_size
        self.num_heads, self.head_dim = keys.shape[1], keys.shape[-1]
        self.store = SharedPrefixStore(self.layer_idx, segments, self.store_factory, batch_size)
        self.seen, self.is_initialized = self.store.length, True

    def _check_compatible(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.is_initialized and self.store.private.length == 0:
            self.batch_size = key_states.shape[0]  # a shared prefix serves any number of rows
        super()._check_compatible(key_states, value_states)

    def tensors(self) -> list[torch.Tensor]:
        held = [] if self.store is None else self.store.tensors()
        return held + ([self.context.token_ids] if self.context.token_ids is not None else [])


def trim_storage(tensor: torch.Tensor, slack_tokens: int) -> torch.Tensor:
    """``tensor`` itself if its storage is at most ``slack_tokens`` larger, else an exact copy."""
    per_token = tensor.numel() // max(1, tensor.shape[2]) * tensor.element_size()
    if tensor.untyped_storage().nbytes() > (tensor.shape[2] + slack_tokens) * per_token:
        return tensor.clone()
    return tensor
