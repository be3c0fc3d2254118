"""Shared bookkeeping for every hf_kvplus cache: the eviction base.

A layer keeps some of the tokens it has seen, in a :class:`~hf_kvplus.storage.base.KVStore`.
Two lengths matter (see ``DESIGN.md`` section 2):

* ``seen``, the **logical** length, is what ``get_seq_length`` returns, so positions keep counting;
* ``kept``, the **physical** length, is what the store holds (at most ``budget`` between forwards).

``get_mask_sizes`` tells the mask builder that ``update`` will return ``kept + query_length``
keys starting at offset ``seen - kept``: the kept keys are treated as contiguous positions ending
at the present, which is exact for a causal mask. Kept tokens stay sorted by position, and left
padding is always evicted before any real token, so the standard 2-D padding mask sliced at that
offset masks exactly the padding still held: padding never leaks into attention after eviction.

A strategy supplies one hook, :meth:`EvictingLayer.score` (higher is kept). The base protects
``num_sink_tokens`` first real tokens and ``recent_window`` newest ones, fills the rest of the
budget by score (by recency when ``score`` returns ``None``) and never touches the store's format.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import CacheLayerMixin

from ..attention import request_attention
from ..storage.base import DenseStore, KVStore
from ..storage.ring import RingStore
from ..storage.slots import POSITION_LIMIT, SlotStore
from .context import CacheContext
from .deferral import Deferral
from .journal import Journal
from .keep import KeepRule
from .slot_mode import SlotMode
from .strategy import StrategyHooks
from .verify import DraftVerification


class EvictingLayer(SlotMode, Deferral, DraftVerification, KeepRule, Journal, StrategyHooks, CacheLayerMixin):
    """One decoder layer's cache: a store, the positions of what it keeps, and an eviction rule.

    Args:
        layer_idx (`int`): index of the decoder layer (used to route attention scores).
        context (`CacheContext`): padding state shared with the other layers.
        budget (`int`, *optional*): tokens kept between forwards, all kinds included; ``None`` keeps all.
        num_sink_tokens (`int`, defaults to 0): first real tokens that are never evicted.
        recent_window (`int`, defaults to 0): newest tokens that are never evicted.
        rope (`tuple[torch.Tensor, float]`, *optional*): ``(inv_freq, attention_scaling)``; when given,
            keys are re-rotated so cached tokens sit at contiguous positions (StreamingLLM).
        store_factory (`Callable[[], KVStore]`, defaults to `DenseStore`): the storage format.

    Example (a strategy overrides ``score``; see ``docs/write_your_own_cache.md``):

    ```python
    >>> class ValueNormLayer(EvictingLayer):
    ...     def score(self):  # [batch, kv_heads, kept]; higher is kept
    ...         return self.store.get()[1].norm(dim=-1)
    ```
    """

    is_sliding = False
    needs_attention = False  # True: `score` needs the attention mass from the "kvplus" attention
    per_head = True  # False: scores are averaged over the KV heads, so every head keeps the same tokens
    implicit_positions = False  # True: a layer that never evicts derives positions (0..seen-1) instead of storing them
    query_groups = 1  # query heads per KV head (set by KVPlusCache from the config)
    slot_protects = True  # slot storage marks protected tokens and evicts by SlotStore.evict (False: slot_evict ranks)
    adaptive = False  # True: AdaKV head-wise budgets (see KeepRule._select_adaptive); set by ScoredCache
    head_floor = 0.2  # AdaKV's safeguard: share of the heavy budget every head keeps whatever the others score
    own_mask_length = False  # True: the mask may be longer than this layer's keys; the "kvplus" attention cuts it

    def __init__(
        self,
        layer_idx: int,
        context: CacheContext,
        budget: int | None = None,
        num_sink_tokens: int = 0,
        recent_window: int = 0,
        rope: tuple[torch.Tensor, float] | None = None,
        store_factory: Callable[[], KVStore] = DenseStore,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.context = context
        self.budget = budget
        self.num_sink_tokens = num_sink_tokens
        self.recent_window = recent_window
        self.rope = rope
        self.store_factory = store_factory
        self.record_past = False
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.store: KVStore | None = None
        self.seen = 0  # logical length: tokens ever appended (minus crops)
        self._pos: torch.Tensor | None = None  # [n] shared, or [batch, kv_heads, n]: absolute column of each kept token
        self._token_state: dict[str, torch.Tensor] = {}  # per-token strategy state, [batch, kv_heads, n]
        self.max_held = 0  # most tokens held between forwards
        self._awaiting_attention = False
        self._pending_rows: list[torch.Tensor] = []
        self.uncommitted = False  # a forward ran while eviction was deferred and no crop has committed it yet
        self.sinks_displaced = False  # a recency eviction moved the sinks away from the window (1-D positions)
        self.verifying, self._verified = 0, None  # draft verification (verify.py)
        self._forward_new = None  # tokens the last update appended (adaptive budgets: a one-token step keeps counts)
        self.head_mask = None  # adaptive budgets: [batch, kv_heads, 1, kept + new] bool, False on unused entries
        self.is_initialized = False

    @property
    def kept(self) -> int:
        return 0 if self.store is None else self.store.length

    @property
    def pos(self) -> torch.Tensor | None:
        """Original position of each kept token: ``[kept]`` shared by every row and head, or ``[batch, kv_heads, kept]``."""
        if isinstance(self.store, RingStore):
            return self.store.positions(self.seen, self.device)
        if isinstance(self.store, SlotStore):
            return self.store.positions()
        return self._pos

    @pos.setter
    def pos(self, value) -> None:
        self._pos = value

    @property
    def token_state(self) -> dict[str, torch.Tensor]:
        """Per-token strategy state, ``{name: [batch, kv_heads, kept]}`` in position order (a copy in slot storage)."""
        if isinstance(self.store, SlotStore):
            return self.store.ordered_state()
        return self._token_state

    @token_state.setter
    def token_state(self, value: dict[str, torch.Tensor]) -> None:
        self._token_state = value

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.store is None or self.kept == 0 else self.store.get()[0]

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None
        if value is not None:
            raise AttributeError("hf_kvplus layers hold keys in their store; use update()")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.store is None or self.kept == 0 else self.store.get()[1]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("hf_kvplus layers hold values in their store; use update()")

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (what :func:`hf_kvplus.cache_nbytes` counts)."""
        held = [] if self.store is None else list(self.store.tensors())
        if self._pos is not None and not isinstance(self.store, (RingStore, SlotStore)):
            held.append(self._pos)
        if isinstance(self.store, RingStore) and self.store.sink_keys is not None and self.context.rope_memo:
            held.extend(self.context.rope_memo.tensors())  # cos, sin of the current shift, shared by every layer
        held.extend(self._token_state.values())  # empty in slot storage (the store holds the state)
        if self.rope is not None:
            held.append(self.rope[0])  # inv_freq, shared by all layers (counted once)
        return held

    def predict_nbytes(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int | None:
        """Bytes :meth:`tensors` will hold after ``tokens`` tokens (``None`` when the store cannot tell).

        The store's own prediction for the kept tokens, plus positions (``int64``: one row, or one per row and
        head once a score-based layer evicted) and per-token state (its dtypes read from :meth:`initial_state`
        on meta tensors). The RoPE table is shared by every layer: see :meth:`KVPlusCache.predict_nbytes`.
        Quantized storage is predicted without eviction only (evicted key groups keep partial scale rows).
        """
        kept = tokens if self.budget is None else min(tokens, self.budget)
        evicted = kept < tokens
        store = self.store_factory()
        if evicted and (type(store) is not DenseStore or self.adaptive):  # adaptive: rows as long as the fullest head
            return None
        held = store.predict_nbytes(batch, kv_heads, kept, head_dim, dtype)
        if held is None:
            return None
        if evicted and self.uses_slots():
            # Slot storage (RingStore): budget + 1 slots and their int64 cursor, no position table, the sinks'
            # first keys (float32, and their rotate_half) when keys are re-rotated.
            sinks = min(self.num_sink_tokens, self.budget) if self.rope is not None else 0
            slots = kept + 1
            sink_keys = 2 * 4 * batch * kv_heads * sinks * head_dim
            cursor = 8 * 2 + 4 * 2 * slots  # the (free, head) cursor (int64) and the [slots, 2] successor table (int32)
            return store.predict_nbytes(batch, kv_heads, slots, head_dim, dtype) + cursor + sink_keys
        scored = type(self).score is not EvictingLayer.score
        position_rows = batch * kv_heads if scored and evicted else 1
        meta = torch.empty(batch, kv_heads, kept, head_dim, dtype=dtype, device="meta")  # [b, h, kept, d]
        state = self.initial_state(meta, meta)
        if evicted and self.uses_score_slots() and tokens < POSITION_LIMIT:
            # Slot storage (SlotStore): budget + 1 slots of keys, values, state, positions and scores, and the
            # slot entries of the recent window.
            slots = kept + 1
            recent = min(self.recent_window, kept - min(self.num_sink_tokens, kept))
            extra = SlotStore.predict_nbytes_extra(batch, kv_heads, slots, recent, not self.per_head,
                                                   [t.element_size() for t in state.values()]
                                                   + [state[name].element_size() for name in self.slot_stepped], dtype,
                                                   self.query_groups if self.needs_attention else 0, head_dim)
            extra += self.slot_extra_nbytes(batch, kv_heads, slots)
            return store.predict_nbytes(batch, kv_heads, slots, head_dim, dtype) + extra
        state_bytes = sum(t.numel() * t.element_size() for t in state.values())
        return held + 8 * position_rows * kept + state_bytes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[0], key_states.shape[1]
        self.head_dim = key_states.shape[-1]
        self.store = self.store_factory()
        self.pos = torch.empty(0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def _check_compatible(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.shape[:3] != key_states.shape[:3]:
            raise ValueError(
                "expected key and value states of shape [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if not self.is_initialized or self.kept == 0:
            return
        if key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(
                f"layer {self.layer_idx} holds {self.dtype} on {self.device} but received {key_states.dtype} on "
                f"{key_states.device}: run the model with the dtype and device the cache was filled with"
            )
        expected = (self.batch_size, self.num_heads)
        if tuple(key_states.shape[:2]) != expected or key_states.shape[-1] != self.head_dim:
            raise ValueError(
                f"layer {self.layer_idx} holds [batch={expected[0]}, kv_heads={expected[1]}, head_dim={self.head_dim}] "
                f"but received key states of shape {tuple(key_states.shape)}"
            )

    @property
    def is_compileable(self) -> bool:
        """True inside a compiled region while the layer is in slot storage (a :class:`RingStore` for sink and
        window, a :class:`SlotStore` for the scorers): its budget full, shapes fixed, slot numbers device tensors or
        entries selected by integers dynamo treats as symbols, so a compiled decoding step replays without
        recompiling (``torch.compile(model.forward)``; tested on CPU with inductor for every slot-capable strategy).

        Outside compilation it is False on purpose: transformers never skips the mask of a compileable
        cache, and an eager one-token step over every kept key needs none (an explicit mask costs four
        ops per layer in SDPA). So ``generate`` does not compile by itself; compile the forward instead.
        """
        return isinstance(self.store, (RingStore, SlotStore)) and torch.compiler.is_compiling()

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` can put this layer back as it was: always without a budget; with one, while
        eviction is deferred (past recording, as assisted and speculative decoding turn on before cropping)."""
        return self.budget is None or self.record_past

    # --------------------------------------------------------------- contract
    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """``update`` (see :class:`~hf_kvplus.eviction.journal.Journal`): append new keys/values, return what
        attention uses, ``[batch, kv_heads, kept + new, head_dim]``."""
        self._check_compatible(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.context.awaiting is not None:  # the previous layer's attention must have reported by now
            self.context.awaiting._check_attention_arrived()
        self._check_attention_arrived()
        new = key_states.shape[-2]
        self._forward_new = new
        if isinstance(self.store, RingStore):
            if new == 1 and not self.record_past and not self.context.padded and not torch.is_grad_enabled():
                return self._ring_step(key_states, value_states)
            self._leave_ring()
        if isinstance(self.store, SlotStore):
            if new == 1 and self._slot_steady():
                return self._slot_step(key_states, value_states)
            self._leave_slots()
        if not self.implicit_positions:
            new_pos = torch.arange(self.seen, self.seen + new, device=self.device)
            if self._pos.dim() == 1:
                self.pos = torch.cat([self._pos, new_pos])
            else:
                self.pos = torch.cat([self._pos, new_pos.expand(*self._pos.shape[:2], new)], dim=-1)
        if self.context.padded:  # a store whose format depends on where each row's real tokens start
            self.store = self.store.for_padding(self.context.pad_host, self.seen)
        # adaptive budgets: heads hold different counts, padded at the front of each row (position -1), which the
        # "kvplus" attention masks per head
        self.head_mask = (self._pos >= 0).unsqueeze(2) if self.adaptive and self._pos.dim() == 3 else None
        keys, values = self.store.update(key_states, value_states)
        self.seen += new
        self._extend_state(key_states, value_states)
        if self.rope is not None:
            keys = self._shift_to_slots(keys)
        if self.record_past:
            self.uncommitted = True
        self.verifying = self.verification_plan(new)  # drafts to verify row by row (needs the "kvplus" attention)
        if self.needs_attention or self.verifying or self.head_mask is not None:
            self._awaiting_attention = True
            self.context.awaiting = self
            request_attention(self.layer_idx, self)
        elif not self.record_past:
            self._evict()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        self._check_attention_arrived()
        kv_length = self.kept + query_length
        kv_offset = self.seen - self.kept
        return kv_length, kv_offset

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1 if self.budget is None else self.budget

    def reset(self) -> None:
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.store.select_batch(index)
        if self._pos is not None and self._pos.dim() == 3:
            self.pos = self._pos.index_select(0, index)
        self._token_state = {k: v.index_select(0, index) for k, v in self._token_state.items()}
        self._pending_rows = [rows.index_select(0, index) for rows in self._pending_rows]
        self.batch_size = index.shape[0]
