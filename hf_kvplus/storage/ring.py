"""Slot storage for a full recency layer (sinks and a sliding window): one write per decoding step.

Once a sink or window layer holds its budget, a decoding step needs no copy of what it keeps: the
new token goes into the slot of the token evicted at the previous step, as in transformers'
``StaticSlidingWindowLayer`` and gpt-fast's ``KVCache``. :class:`RingStore` holds
``[batch, kv_heads, budget + 1, head_dim]`` buffers: ``sinks`` fixed slots first, then a ring of
window slots, one of which is free between forwards. A step writes the new token into the free
slot, attention reads the whole buffer, and the oldest window slot becomes the free one. The slot
numbers are kept twice: host integers for bookkeeping, and a device ``cursor`` the step indexes with
and advances itself through a successor table, so the step makes no host sync, allocates nothing,
and, compiled, takes no Python integer that changes from step to step.

Attention over one query with no padding does not depend on the order of the keys, which is why
the buffer is handed to attention as it is; :meth:`RingStore.get` gives the kept tokens in
position order (sinks, then the window oldest first) for everything else. Attention weights returned
with ``output_attentions=True`` (eager attention) are in slot order during such steps. Layers stay in
(or go back to) the dense layout with padding in the batch, for forwards of several tokens, while
eviction is deferred (assisted decoding), and when autograd records the forward.

With key re-rotation (StreamingLLM's position shift), the sink slots hold the sinks rotated to sit
just before the window; :meth:`RingStore.shift_sinks` rewrites them from the keys as first cached
(``sink_keys``, float32, with their ``rotate_half`` of the model's channel layout precomputed), so nothing drifts.
"""

from __future__ import annotations

import torch

from ..rope import channel_freq, rotate
from .base import SlotStoreBase


class RingStore(SlotStoreBase):
    """Fixed slots for a recency layer holding its budget (see the module docstring).

    Args:
        keys (`torch.Tensor`): ``[batch, kv_heads, budget, head_dim]`` kept keys in position order,
            the ``sinks`` first (as the model rotated them at their positions).
        values (`torch.Tensor`): ``[batch, kv_heads, budget, head_dim]``.
        sinks (`int`): leading tokens never evicted.
        rotary_dim (`int`, *optional*): channels RoPE rotates (``2 * len(inv_freq)``); given when sink
            keys are re-rotated, ``None`` otherwise.
        layout (`str`, *optional*, defaults to ``"half"``): RoPE channel layout (:data:`hf_kvplus.rope.LAYOUTS`).

    Example:

    ```python
    >>> ring = RingStore(keys, values, sinks=4)  # [1, 2, 8, 16] each: budget 8
    >>> ring.write(new_key, new_value)            # [1, 2, 1, 16]: goes into the free slot
    >>> ring.evict_oldest()                       # the oldest window token's slot is free again
    >>> ring.get()[0].shape                       # position order, budget tokens
    torch.Size([1, 2, 8, 16])
    ```
    """

    evict_with = "evict_oldest()"

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, sinks: int, rotary_dim: int | None = None,
                 layout: str | None = "half"):
        batch, heads, budget, head_dim = keys.shape
        self.capacity = budget + 1
        self.keys = keys.new_empty(batch, heads, self.capacity, head_dim)  # [batch, kv_heads, budget + 1, head_dim]
        self.values = values.new_empty(batch, heads, self.capacity, values.shape[-1])
        self.keys[:, :, :budget].copy_(keys)
        self.values[:, :, :budget].copy_(values)
        self.sink_slots = self.keys[:, :, :sinks]  # [batch, kv_heads, sinks, head_dim] view
        self.sinks = sinks
        self.free = budget  # the slot the next token is written to
        self.head = sinks  # the slot of the oldest window token
        # The same two slot numbers on the device, so a step indexes with a tensor (no host value enters the
        # graph when compiled): `cursor[0] = (free, head)`, and `successor[h] = (h, next window slot after h)`.
        ring = torch.arange(sinks, self.capacity, device=keys.device)  # [capacity - sinks]
        successor = torch.stack([torch.arange(self.capacity, device=keys.device),
                                 torch.cat([ring[:1].expand(sinks), ring.roll(-1)])], dim=1)  # [capacity, 2]
        self.successor = successor.to(torch.int32)  # int32 (half the bytes); copied into the int64 cursor
        self.cursor = torch.tensor([[budget, sinks]], device=keys.device)  # [1, 2] long: (free slot, head slot)
        self.free_slot, self.head_slot = self.cursor[0, :1], self.cursor[0, 1:]  # [1] views
        self.full = False  # True between a write and the eviction that follows it
        self.shift = 0  # positions the sink slots are currently rotated by
        self.sink_keys = self.sink_half = None
        if rotary_dim is not None and sinks:
            sink = keys[:, :, :sinks].to(torch.float32, copy=True)  # [batch, kv_heads, sinks, head_dim], owned
            half = torch.zeros_like(sink)
            half[..., :rotary_dim] = rotate(sink[..., :rotary_dim], layout or "half")
            self.sink_keys, self.sink_half = sink, half

    # ----------------------------------------------------------------- the step
    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one new token (``[batch, kv_heads, 1, head_dim]``) into the free slot."""
        self.keys.index_copy_(2, self.free_slot, keys)
        self.values.index_copy_(2, self.free_slot, values)
        self.full = True

    def evict_oldest(self) -> None:
        """Free the oldest window slot (its data stays until the next write): two ops on the device cursor."""
        self.cursor.copy_(self.successor.index_select(0, self.head_slot))  # (free, head) <- (head, next(head))
        self.free = self.head
        self.head = self.head + 1 if self.head + 1 < self.capacity else self.sinks
        self.full = False

    def shift_sinks(self, cos: torch.Tensor, sin: torch.Tensor, shift: int) -> None:
        """Rotate the sink slots by ``shift`` positions from their first keys; ``cos``/``sin``: ``[head_dim]`` float32."""
        slots = self.sink_slots  # [batch, kv_heads, sinks, head_dim]
        if slots.dtype == torch.float32 and not torch.compiler.is_compiling():  # dynamo refuses a strided out=
            torch.mul(self.sink_keys, cos, out=slots)
            slots.addcmul_(self.sink_half, sin)
        else:
            slots.copy_(torch.addcmul(self.sink_keys * cos, self.sink_half, sin))
        self.shift = shift

    # ------------------------------------------------------------- bookkeeping
    def order(self) -> list[int]:
        """Slots in position order: sinks, then window slots from the oldest (every slot while full)."""
        window = self.capacity - self.sinks - (0 if self.full else 1)
        ring = [self.sinks + (self.head - self.sinks + i) % (self.capacity - self.sinks) for i in range(window)]
        return list(range(self.sinks)) + ring

    def positions(self, seen: int, device) -> torch.Tensor:
        """Original positions of the kept tokens in position order (``[kept]`` long)."""
        window = self.length - self.sinks
        return torch.cat([torch.arange(self.sinks, device=device), torch.arange(seen - window, seen, device=device)])

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept keys and values in position order, sinks as the model rotated them (a copy)."""
        index = torch.tensor(self.order(), device=self.keys.device)
        keys = self.keys.index_select(2, index)
        if self.sink_keys is not None and self.shift:
            keys[:, :, : self.sinks] = self.sink_keys.to(keys.dtype)
        return keys, self.values.index_select(2, index)

    def tensors(self) -> list[torch.Tensor]:
        held = [self.keys, self.values, self.cursor, self.successor]
        return held + [t for t in (self.sink_keys, self.sink_half) if t is not None]

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows (beam search): every row uses the same slots, so only rows move."""
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.sink_slots = self.keys[:, :, : self.sinks]
        if self.sink_keys is not None:
            self.sink_keys, self.sink_half = self.sink_keys.index_select(0, index), self.sink_half.index_select(0, index)


class RopeAngles:
    """``cos`` and ``sin`` (``[head_dim]`` float32) rotating keys by a shift, recomputed in place per step.

    Angles are ``shift * inv_freq`` in float64 (as ``shift_keys`` computes them; float32 angles would be off
    by milliradians after 100k positions), rounded to float32 once; channels past ``2 * len(inv_freq)``
    (partial rotary) get ``cos = 1``, ``sin = 0``; ``layout`` places each frequency on its channels. Four small ops per step, shared by every layer of a cache.
    """

    def __init__(self, inv_freq: torch.Tensor, head_dim: int, device, layout: str = "half"):
        freq = torch.zeros(head_dim, dtype=torch.float32, device=device)  # [head_dim]: pass-through channels at 0
        freq[: 2 * inv_freq.shape[-1]] = channel_freq(inv_freq.to(device, torch.float32), layout)
        self.freq, self.device, self.shift = freq, device, None
        self.cos = torch.ones(head_dim, dtype=torch.float32, device=device)
        self.sin = torch.zeros(head_dim, dtype=torch.float32, device=device)

    def at(self, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        if shift != self.shift:
            angles = self.freq.double() * shift  # [head_dim] float64
            torch.cos(angles, out=self.cos)
            torch.sin(angles, out=self.sin)
            self.shift = shift
        return self.cos, self.sin

    def tensors(self) -> list[torch.Tensor]:
        return [self.freq, self.cos, self.sin]

    @staticmethod
    def predict_nbytes(head_dim: int) -> int:
        return 3 * 4 * head_dim
