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

import math
from collections.abc import Callable

import torch
from transformers import Cache, CacheLayerMixin, PreTrainedConfig

from ..attention import request_attention
from ..rope import shift_keys
from ..storage.base import DenseStore, KVStore, gather_tokens
from ..storage.factory import STORAGE_KEYWORDS, make_store_factory
from ..storage.ring import RingStore, RopeAngles
from ..storage.slots import POSITION_LIMIT, SlotStore


def _positive_int(name: str, value, allow_none: bool = False, minimum: int = 1) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def decoder_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder text config; a clear error for objects that are not configs or have no attention heads."""
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"expected a transformers model or PreTrainedConfig, got {type(config).__name__}")
    config = config.get_text_config(decoder=True)
    for attr in ("num_hidden_layers", "num_attention_heads"):
        value = getattr(config, attr, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{type(config).__name__} has {attr}={value!r}: hf_kvplus caches need a decoder config with an integer "
                f"{attr} >= 1"
            )
    return config


def text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder text config, checked: attention heads, and only full-attention layers."""
    config = decoder_config(config)
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise ValueError(
            f"hf_kvplus caches support models whose layers all use full attention; this config has {other}"
        )
    return config


def check_storage_keywords(cache_name: str, storage: dict, accepted: list[str]) -> None:
    """A ``TypeError`` for keywords that are neither the cache's own (``accepted``) nor storage keywords."""
    storage_names = ["store_factory", *STORAGE_KEYWORDS]
    unknown = sorted(set(storage) - set(storage_names))
    if unknown:
        raise TypeError(
            f"{cache_name} got unexpected keyword argument(s) {unknown}; it accepts {accepted + storage_names}"
        )


def kv_geometry(config: PreTrainedConfig) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` of a decoder config."""
    config = text_config(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


class CacheContext:
    """State shared by the layers of one cache: the left padding of each batch row.

    ``pad_len[b]`` counts the padding columns at the start of row ``b``. ``observed`` tells
    whether the inputs were seen at all (through :func:`hf_kvplus.attach`); without it, an
    evicting cache refuses batches it cannot prove are unpadded.

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("sink", model, budget=256)
    >>> model(input_ids, attention_mask=mask, cache=cache)  # the hook fills cache.context
    >>> cache.context.pad_len  # tensor of left-padding columns per row
    ```
    """

    def __init__(self) -> None:
        self.pad_len: torch.Tensor | None = None  # [batch] long
        self.pad_host: list[int] | None = None  # host copy of `pad_len`, read once with it (never per step)
        self.padded = False  # any(pad_host)
        self.mask_length: int | None = None  # columns of the last 2-D mask read (a decode step adds one real column)
        self.observed = False
        self.awaiting: EvictingLayer | None = None  # the layer whose attention scores are due
        self.rope_memo = None  # RopeAngles: cos and sin of the sinks' shift, shared by the layers of one step

    def set_padding(self, pad_len: torch.Tensor | None) -> None:
        """Record each row's left padding (``[batch]`` long); reads it on the host once, outside decoding steps."""
        self.pad_len = pad_len
        self.pad_host = None if pad_len is None else pad_len.tolist()
        self.padded = bool(self.pad_host) and any(self.pad_host)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.pad_len is not None:
            self.set_padding(self.pad_len.index_select(0, index.to(self.pad_len.device)))

    def reset(self) -> None:
        self.set_padding(None)
        self.mask_length = None
        self.observed = False
        self.awaiting = None
        self.rope_memo = None


class EvictingLayer(CacheLayerMixin):
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
        if evicted and type(store) is not DenseStore:
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
            cursor = 8 * 2 * (slots + 1)  # int64: the (free, head) cursor and the [slots, 2] successor table
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
                                                   [t.element_size() for t in state.values()], dtype,
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
        """True inside a compiled region while the layer is in slot storage: its budget full, shapes fixed,
        slot numbers and RoPE shifts device tensors or integers dynamo treats as symbols, so a compiled
        decoding step replays without recompiling (``torch.compile(model.forward)``; tested on CPU).

        Outside compilation it is False on purpose: transformers never skips the mask of a compileable
        cache, and an eager one-token step over every kept key needs none (an explicit mask costs four
        ops per layer in SDPA). So ``generate`` does not compile by itself; compile the forward instead.
        """
        return isinstance(self.store, RingStore) and torch.compiler.is_compiling()

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` can put this layer back as it was: always without a budget; with one, while
        eviction is deferred (past recording, as assisted and speculative decoding turn on before cropping)."""
        return self.budget is None or self.record_past

    # --------------------------------------------------------------- contract
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new keys/values; return what attention uses: ``[batch, kv_heads, kept + new, head_dim]``."""
        self._check_compatible(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.context.awaiting is not None:  # the previous layer's attention must have reported by now
            self.context.awaiting._check_attention_arrived()
        self._check_attention_arrived()
        new = key_states.shape[-2]
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
        keys, values = self.store.update(key_states, value_states)
        self.seen += new
        self._extend_state(key_states, value_states)
        if self.rope is not None:
            keys = self._shift_to_slots(keys)
        if self.record_past:
            self.uncommitted = True
        if self.needs_attention:
            self._awaiting_attention = True
            self.context.awaiting = self
            request_attention(self.layer_idx, self)
        elif not self.record_past:
            self._evict()
        return keys, values

    # ------------------------------------------------------------ slot storage
    def uses_slots(self) -> bool:
        """Whether this layer decodes in slot storage once full: recency eviction (no scores, attention or
        per-token state) over dense storage. ``predict_nbytes`` and the decoding path both ask this."""
        return (
            self.budget is not None
            and type(self).score is EvictingLayer.score
            and type(self).initial_state is EvictingLayer.initial_state
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
        self.store = RingStore(keys, values, sinks, rotary_dim)
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
            and type(self).slot_score is not EvictingLayer.slot_score
            and self.store_factory is DenseStore
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
                               protect=self.slot_protects)
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
            angles = self.context.rope_memo = RopeAngles(self.rope[0], self.head_dim, self.device)
        return angles.at(shift)

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
        """Hook for slot storage: fold a step's probabilities (``[batch * kv_heads, groups, slots]``) into the state."""

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

    # --------------------------------------------------------------- eviction
    def observe_attention(self, mass: torch.Tensor, reduction: str) -> None:
        """Receive the attention computed over what ``update`` returned (from the "kvplus" attention)."""
        self._awaiting_attention = False
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
                f"{type(self).__name__} (layer {self.layer_idx}) received no attention scores: the model does not use "
                "the 'kvplus' attention. Build the cache with hf_kvplus.make_cache(name, model, ...) or call "
                "hf_kvplus.attach(model, attention_scores=True) once before generating."
            )

    def _commit(self, dropped: int) -> None:
        """Fold attention recorded while eviction was deferred (minus ``dropped`` rejected queries), then evict."""
        self.uncommitted = False
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
        if self.budget is not None and kept > self.budget:
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
            shifted = shift_keys(keys[:, :, :sinks], shift, self.rope[0])
            return torch.cat([shifted, keys[:, :, sinks:]], dim=-2)
        slots = torch.arange(self.seen - length, self.seen, device=self.device)
        return shift_keys(keys, slots - self.pos, self.rope[0])  # [batch, kv_heads, n] shifts


class KVPlusCache(Cache):
    """A ``transformers.Cache`` of :class:`EvictingLayer` (or subclass) layers sharing one :class:`CacheContext`.

    Subclasses set ``layer_class`` and pass the layer keyword arguments; see ``SinkCache``. Storage
    keywords (``nbits=``, ``store_factory=``...) go to :func:`~hf_kvplus.storage.base.make_store_factory`,
    so every strategy runs over every storage format.

    Args:
        config (`PreTrainedConfig`): the model's config (layers, KV heads and head size are read from it).
        store_factory (`Callable[[], KVStore]`, *optional*): the storage format of every layer.
        nbits (`int`, *optional*): 8, 4 or 2 for packed storage (with ``group_size=``, ``residual_length=``).
        **layer_kwargs: keyword arguments of ``layer_class`` (``budget``, ``num_sink_tokens``, ...).

    Example:

    ```python
    >>> class ValueNormCache(KVPlusCache):
    ...     layer_class = ValueNormLayer
    >>> cache = ValueNormCache(model.config, budget=256, nbits=4)
    ```
    """

    layer_class: type[EvictingLayer] = EvictingLayer

    def __init__(self, config: PreTrainedConfig, store_factory=None, nbits=None, **layer_kwargs):
        num_layers, self.num_kv_heads, self.head_dim = kv_geometry(config)
        self.context = CacheContext()
        storage = {name: layer_kwargs.pop(name) for name in STORAGE_KEYWORDS if name in layer_kwargs}
        layer_kwargs["store_factory"] = make_store_factory(store_factory=store_factory, nbits=nbits, **storage)
        layers = [self.layer_class(i, self.context, **layer_kwargs) for i in range(num_layers)]
        heads = decoder_config(config).num_attention_heads
        for layer in layers:
            layer.query_groups = max(1, heads // self.num_kv_heads)
        super().__init__(layers=layers)

    def predict_nbytes(self, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int | None:
        """Bytes :func:`hf_kvplus.cache_nbytes` will count once ``tokens`` tokens went through this (fresh) cache.

        Example:

        ```python
        >>> cache = hf_kvplus.make_cache("sink", model.config, budget=256)
        >>> cache.predict_nbytes(4096, batch=1, dtype=torch.bfloat16)  # the same after 300 tokens or 300,000
        ```
        """
        per_layer = [layer.predict_nbytes(batch, self.num_kv_heads, tokens, self.head_dim, dtype) for layer in self.layers]
        if any(p is None for p in per_layer):
            return None
        tables = {id(layer.rope[0]): layer.rope[0].untyped_storage().nbytes() for layer in self.layers
                  if layer.rope is not None and tokens}
        slots_with_sinks = any(
            layer.uses_slots() and tokens > layer.budget and layer.rope is not None and layer.num_sink_tokens
            for layer in self.layers
        )
        angles = RopeAngles.predict_nbytes(self.head_dim) if slots_with_sinks else 0  # the sinks' shift, shared
        shared: dict = {}  # buffers every layer's store shares (the quantized stores' scratch), counted once
        for layer in self.layers:
            kept = tokens if layer.budget is None else min(tokens, layer.budget)
            for key, nbytes in layer.store_factory().shared_nbytes(batch, self.num_kv_heads, kept, self.head_dim,
                                                                   dtype).items():
                shared[key] = max(shared.get(key, 0), nbytes)
        return sum(per_layer) + sum(tables.values()) + angles + sum(shared.values())

    @property
    def evicts(self) -> bool:
        return any(layer.budget is not None for layer in self.layers)

    @property
    def budget(self) -> int | None:
        return self.layers[0].budget if self.layers else None

    def end_stale_recording(self) -> None:
        """Stop deferring eviction once generation has left assisted decoding.

        Assisted and prompt-lookup decoding activate past recording and call ``crop`` after every forward;
        generate leaves recording on in the cache it returns. A forward starting while the previous one
        was never cropped means nobody will crop any more (for example ``generate`` continuing from that
        cache without an assistant): the pending tokens are committed and eviction resumes after each
        forward, so the budget holds again. Called before each forward (mask sizes, model hook).
        """
        if any(layer.uncommitted for layer in self.layers if isinstance(layer, EvictingLayer)):
            for layer in self.layers:
                layer.end_past_recording()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        self.end_stale_recording()
        return super().get_mask_sizes(query_length, layer_idx)

    def observe_inputs(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Learn each row's left padding from the call's 2-D attention mask (done by the model hook)."""
        self.end_stale_recording()
        self.context.observed = True
        seen = self.get_seq_length()
        if isinstance(attention_mask, dict):  # one mask per attention type: padding shows in the full one
            attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            attention_mask = self._padding_from_4d(attention_mask, seen, query_length)
        if attention_mask is None or attention_mask.dim() != 2:
            return
        context = self.context
        if query_length == 1 and context.mask_length == seen and attention_mask.shape[-1] == seen + 1:
            # A decoding step: generate appends one real column to the mask whose padding was read at prefill.
            # Nothing is read back from the device here (no host sync per step).
            context.mask_length = seen + 1
            return
        mask = attention_mask.to(torch.bool)
        if mask.shape[-1] == query_length and seen > 0:
            if bool(mask.all()):
                return
            history = None
        elif mask.shape[-1] == seen + query_length:
            history = mask
        else:
            return  # transformers will reject or interpret the mask itself
        left_padded = history is not None and bool((history[:, 1:] >= history[:, :-1]).all())
        if not left_padded:
            if self.evicts:
                raise ValueError(
                    f"{type(self).__name__} evicts tokens, so it supports left padding only (padding columns first, "
                    "then real tokens); this attention mask has padding after real tokens. Pad on the left "
                    "(tokenizer.padding_side='left') and pass the full mask."
                )
            return
        context.set_padding((~history).sum(dim=-1))
        context.mask_length = history.shape[-1]

    @staticmethod
    def _padding_from_4d(mask: torch.Tensor, seen: int, query_length: int) -> torch.Tensor | None:
        """The 2-D padding mask behind a 4-D one (``[batch, 1, query, kv]``), which ``generate`` builds itself
        for a compileable cache: when the columns are every position so far (nothing evicted yet), the last
        query, which sees every earlier position, attends exactly the real tokens. ``None`` for a one-token
        step (its padding was read at prefill) or when the columns are not every position."""
        if query_length == 1 or mask.shape[-1] != seen + query_length:
            return None
        last = mask[:, 0, -1]  # [batch, seen + query]: bool (True attends) or additive float (0 attends)
        return last if last.dtype == torch.bool else last == 0

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the newest ``-tokens_to_remove`` tokens in every layer, or in none (``ValueError``)."""
        for layer in self.layers:
            if isinstance(layer, EvictingLayer):
                layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)
        if tokens_to_remove:
            self.context.mask_length = None  # the next mask is read again

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.context.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self.context.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.context.pad_len is not None:
            self.context.set_padding(self.context.pad_len.repeat_interleave(repeats))

    def reset(self) -> None:
        super().reset()
        self.context.reset()

    @property
    def max_held(self) -> int:
        """Most tokens any layer held between forwards since the last reset."""
        return max((layer.max_held for layer in self.layers), default=0)

