"""Slot storage for a score-based layer holding its budget: one write and one argmin per decoding step.

Once a scored layer (H2O, TOVA, key norm, SnapKV) holds its budget, a decoding step needs no copy of
what it keeps. :class:`SlotStore` holds ``[batch, kv_heads, budget + 1, head_dim]`` buffers and, per
slot, the token's position and the strategy's state (accumulated attention, key norm...). A step
writes the new token into the free slot, attention reads every slot, the strategy updates its state
in place, and one ``argmin`` over the candidate slots picks the victim, whose slot is the next free
one. Slot numbers stay on the device (each head evicts its own token), so nothing is read back and
nothing is allocated that grows with the context.

Which slots compete, without sorting anything:

* the ``sinks`` first tokens (the first slots) and the ``recent`` newest tokens carry ``PROTECTED``
  added to their position, which puts them after every candidate; the slot each recent token went
  to is kept in a ring of ``recent + 1`` index entries, so when a token leaves the window its
  position is written back unmarked (one ``scatter_``);
* ties: the victim minimises ``position + bits(score) * 2**30`` (int64). The bit pattern of a
  float32 read as an int32 grows with its magnitude among numbers of one sign, so this key orders
  by score first and, among equal scores, evicts the older token, exactly as the position-ordered
  rule does (``EvictingLayer._select``). Positions must stay below ``2**30``.

:meth:`SlotStore.get` gives the kept tokens in position order (a copy), as the layer hands them to
everything but a decoding step (crop, past recording, padding, forwards of several tokens, autograd).
"""

from __future__ import annotations

import torch

from .base import SlotStoreBase, gather_tokens

POSITION_LIMIT = 1 << 30  # positions below this keep the eviction key exact
PROTECTED = (1 << 62) + (1 << 31)  # added to the position of a protected recent token: above every candidate's key


class SlotStore(SlotStoreBase):
    """Fixed slots for a score-based layer holding its budget (see the module docstring).

    Args:
        keys (`torch.Tensor`): ``[batch, kv_heads, budget, head_dim]`` kept keys in position order.
        values (`torch.Tensor`): ``[batch, kv_heads, budget, value_dim]``.
        pos (`torch.Tensor`): positions of the kept tokens, ``[budget]`` or ``[batch, kv_heads, budget]`` (sorted).
        state (`dict[str, torch.Tensor]`): per-token strategy state, ``[batch, kv_heads, budget]`` each.
        sinks (`int`): leading tokens never evicted (the first slots).
        recent (`int`): newest tokens never evicted.
        shared (`bool`): every head keeps the same tokens (one position row and one victim per batch row).
        seen (`int`): tokens seen so far (the position of the next one).
        protect (`bool`, defaults to `True`): mark protected positions (see the module docstring); `False` for a
            strategy that ranks in position order itself (SnapKV), which never calls :meth:`release`/:meth:`evict`.
        stepped (`tuple[str, ...]`, defaults to `()`): state a step rewrites as a whole (an accumulated mass, the
            latest attention). Each gets a spare buffer: a step writes the new state there and :meth:`advance`
            swaps the two, so the state before the step stays intact until the step ends and a refused forward
            is undone by putting the references back (no copy per step; see :mod:`hf_kvplus.eviction.journal`).

    Example:

    ```python
    >>> slots = SlotStore(keys, values, pos, {"mass": mass}, sinks=0, recent=4, shared=False, seen=100)
    >>> slots.write(new_key, new_value, 100)         # [batch, kv_heads, 1, head_dim] into the free slots
    >>> slots.release()                               # the token leaving the recent window competes
    >>> slots.evict("mass", 1)                        # one argmin per row and head: the victims' slots are free
    >>> slots.get()[0].shape                          # position order, budget tokens
    ```
    """

    def __init__(self, keys, values, pos, state, sinks: int, recent: int, shared: bool, seen: int, protect: bool = True,
                 stepped: tuple[str, ...] = ()):
        batch, heads, budget, head_dim = keys.shape
        rows = 1 if shared else heads
        capacity = budget + 1
        self.capacity, self.sinks, self.recent, self.rows, self.seen = capacity, sinks, recent, rows, seen
        self.protect = protect
        self.full = False  # True between a write and the eviction that follows it
        self.keys = keys.new_empty(batch, heads, capacity, head_dim)  # [batch, kv_heads, budget + 1, head_dim]
        self.values = values.new_empty(batch, heads, capacity, values.shape[-1])
        self.keys[:, :, :budget].copy_(keys)
        self.values[:, :, :budget].copy_(values)
        pos = pos.expand(batch, heads, budget)[:, :rows]  # [batch, rows, budget]
        self.pos = pos.new_zeros(batch, rows, capacity)  # [batch, rows, budget + 1] int64; free slot: 0
        self.pos[..., :budget].copy_(pos)
        if protect:
            self.pos[..., budget - recent : budget] += PROTECTED
            self.pos[..., :sinks] += PROTECTED
        self.state = {}
        for name, value in state.items():  # [batch, kv_heads, budget + 1] each
            self.state[name] = value.new_zeros(batch, heads, capacity)
            self.state[name][..., :budget].copy_(value)
        self.spare = {name: torch.zeros_like(self.state[name]) for name in stepped}  # [batch, kv_heads, budget + 1]
        self.score = self.keys.new_zeros(batch, rows, capacity, dtype=torch.float32)  # scores computed per step
        self.no_bias = self.keys.new_zeros(1, 1, 1)  # attention logits' additive input when there is no mask
        # Slot of each recent token, entry 1 + position % (recent + 1): row 0 is never used, so no entry a step
        # selects starts at offset 0 (compiled, an offset that is sometimes 0 would be specialised on, and recompiled).
        self.entries = self.pos.new_zeros(recent + 2, batch, rows, 1)
        for p in range(seen - recent, seen + 1):  # the recent tokens, then the free slot for token `seen`
            self.entry(p).fill_(budget - (seen - p))
        self.extra: dict[str, torch.Tensor] = {}  # buffers of the strategy's own slot step (SnapKV)
        self.state_in_extra: dict[str, tuple[str, int]] = {}  # state held inside an extra buffer (see share_state)
        self._views()

    def _views(self) -> None:
        """Views made once, so a step makes fewer: 3-D views of the state, keys and values."""
        batch, heads, capacity, head_dim = self.keys.shape
        self.rows3 = {name: t.view(batch * heads, 1, capacity) for name, t in self.state.items()}  # [b*h, 1, slots]
        self.spare_rows3 = {name: t.view(batch * heads, 1, capacity) for name, t in self.spare.items()}
        self.keys_t3 = self.keys.view(batch * heads, capacity, head_dim).transpose(1, 2)  # [b*h, head_dim, slots]
        self.values3 = self.values.view(batch * heads, capacity, -1)  # [b*h, slots, value_dim]
        self._ones = None
        self.output = self._output3 = None  # attention output of a step (see output_buffer)
        self.extra_views: dict[str, torch.Tensor] = {}  # views of `extra`, made by the strategy when empty

    def share_state(self, name: str, buffer: str, index: int) -> None:
        """Hold ``state[name]`` inside ``extra[buffer]`` (``[batch, kv_heads, parts, slots]``) as its part ``index``,
        so a strategy can gather it with other per-slot rows in one op. Kept so through :meth:`select_batch`."""
        batch, heads, capacity = self.state[name].shape
        view = self.extra[buffer].select(2, index)  # [batch, kv_heads, slots]
        view.copy_(self.state[name])
        self.state[name], self.state_in_extra[name] = view, (buffer, index)
        self.rows3[name] = view.view(batch * heads, 1, capacity)

    def entry(self, position: int) -> torch.Tensor:
        """The ``[batch, rows, 1]`` entry (a view) for the token at ``position``: its slot once written, the slot it is
        written to before. Selected with the integer itself (no list of views), so a compiled step treats ``position``
        as a symbol and replays without recompiling."""
        return self.entries[1 + position % (self.recent + 1)]

    def _entry_as(self, position: int, like: torch.Tensor) -> torch.Tensor:
        """:meth:`entry` expanded to index ``like`` along dim 2 (``[batch, kv_heads, 1, ...]``, a view)."""
        index = self.entry(position)  # [batch, rows, 1]
        if like.dim() == 4:
            index = index.unsqueeze(-1)
        return index.expand(*like.shape[:2], 1, *like.shape[3:])

    def output_buffer(self, q_heads: int, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output of a step, ``[batch, 1, q_heads, value_dim]`` (made at the first step, then reused),
        and its ``[batch * kv_heads, groups, value_dim]`` view for ``bmm(out=)``."""
        batch, heads = self.keys.shape[:2]
        if self.output is None or self.output.shape[2:] != (q_heads, value_dim):
            self.output = self.values.new_empty(batch, 1, q_heads, value_dim)
            self._output3 = self.output.view(batch * heads, q_heads // heads, value_dim)
        return self.output, self._output3

    def ones(self, groups: int) -> torch.Tensor:
        """``[batch * kv_heads, 1, groups]`` float32 ones (a view of one ``[1, 1, groups]`` tensor), to sum
        probabilities over the query heads of a group (made at the first step)."""
        if self._ones is None or self._ones.shape[-1] != groups:
            rows = self.keys.shape[0] * self.keys.shape[1]
            self._ones = self.score.new_ones(1, 1, groups).expand(rows, 1, groups)
        return self._ones

    def advance(self, name: str) -> None:
        """The spare of ``state[name]`` (which a step just filled through ``spare_rows3[name]``) becomes the state;
        the old state becomes the spare. Swaps references only: no op runs."""
        self.state[name], self.spare[name] = self.spare[name], self.state[name]
        self.rows3[name], self.spare_rows3[name] = self.spare_rows3[name], self.rows3[name]

    def references(self) -> tuple[dict, ...]:
        """What :meth:`advance` changes, for the journal to put back (copies of the dicts, not of tensors)."""
        return dict(self.state), dict(self.spare), dict(self.rows3), dict(self.spare_rows3)

    def restore_references(self, held: tuple[dict, ...]) -> None:
        self.state, self.spare, self.rows3, self.spare_rows3 = (dict(d) for d in held)

    def undo_step(self, position: int) -> None:
        """Undo the slot bookkeeping of the step that wrote the token at ``position`` and evicted (a refused
        forward only; never in a step): the entry the victim's slot went to holds again the slot of the token
        that left the recent window, and that token is protected again. The written slot is free again once
        ``seen`` is put back; states rewritten as a whole come back through :meth:`restore_references`."""
        left = position - self.recent  # the token that left the recent window (``position`` itself without one)
        slot = self.positions_by_slot().eq(left).to(torch.uint8).argmax(-1, keepdim=True)  # [batch, rows, 1]
        self.entry(position + 1).copy_(slot)
        if self.recent and self.protect:
            self.pos.scatter_(2, slot, left + PROTECTED)

    # ----------------------------------------------------------------- the step
    def write(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        """Put the token at ``position`` (``[batch, kv_heads, 1, head_dim]``) into the free slots."""
        self.keys.scatter_(2, self._entry_as(position, self.keys), keys)
        self.values.scatter_(2, self._entry_as(position, self.values), values)
        self.pos.scatter_(2, self.entry(position), position + (PROTECTED if self.recent and self.protect else 0))
        self.seen = position + 1
        self.full = True

    def write_state(self, name: str, value, position: int) -> None:
        """Set ``state[name]`` of the token just written: a number, or ``[batch, kv_heads, 1]``."""
        self.state[name].scatter_(2, self._entry_as(position, self.state[name]), value)

    def release(self) -> None:
        """The token leaving the recent window (written ``recent`` steps ago) competes from now on: its position
        loses the protection. Called after a write, before the scores are computed."""
        if self.recent:
            entry = self.entry(self.seen)  # the slot of the token leaving (the next free entry)
            self.pos.scatter_(2, entry, self.seen - 1 - self.recent)

    def evict(self, name: str, direction: int) -> None:
        """Free one slot per row (and head): the lowest score among candidates, the older on ties.

        ``name``: the state (or ``"score"``) holding the scores, one sign for every candidate; ``direction``
        is ``1`` when a larger magnitude means a higher score (scores >= 0, or their negation), else ``-1``.
        """
        scores = self.score if name == "score" else self.state[name]  # float32 [batch, rows, slots]
        bits = scores.view(torch.int32)  # a view made here: compiled, a step takes no input aliased across dtypes
        key = torch.add(self.pos, bits, alpha=direction * POSITION_LIMIT)  # [batch, rows, slots]
        torch.argmin(key, dim=-1, keepdim=True, out=self.entry(self.seen))  # the victim's slot: the next token's
        self.full = False

    # ------------------------------------------------------------- bookkeeping
    def order(self) -> torch.Tensor:
        """Slots of the kept tokens in position order, ``[batch, rows, kept]`` (not for the decoding step)."""
        pos = self.positions_by_slot()
        if not self.full:  # the free slot holds an evicted token: sort it last
            pos = pos.scatter(2, self.entry(self.seen), torch.iinfo(torch.long).max)
        return pos.sort(dim=-1, stable=True).indices[..., : self.length]

    def positions_by_slot(self) -> torch.Tensor:
        """Positions of the tokens in every slot, protection removed: ``[batch, rows, budget + 1]``."""
        return torch.where(self.pos >= PROTECTED, self.pos - PROTECTED, self.pos)

    def positions(self, order: torch.Tensor | None = None) -> torch.Tensor:
        """Positions of the kept tokens in position order, ``[batch, kv_heads, kept]``."""
        order = self.order() if order is None else order
        return torch.gather(self.positions_by_slot(), 2, order).expand(-1, self.keys.shape[1], -1).contiguous()

    def _head_order(self, order: torch.Tensor) -> torch.Tensor:
        return order.expand(-1, self.keys.shape[1], -1)  # [batch, kv_heads, kept]

    def get(self, order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept keys and values in position order (a copy), ``[batch, kv_heads, kept, head_dim]``."""
        index = self._head_order(self.order() if order is None else order)
        return gather_tokens(self.keys, index), gather_tokens(self.values, index)

    def ordered_state(self, order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-token state in position order (copies), ``{name: [batch, kv_heads, kept]}``."""
        index = self._head_order(self.order() if order is None else order)
        return {name: torch.gather(t, 2, index) for name, t in self.state.items()}

    def tensors(self) -> list[torch.Tensor]:
        held = [self.keys, self.values, self.pos, self.score, self.entries, self.no_bias, *self.state.values(),
                *self.spare.values(), *self.extra.values()]
        return held + [t for t in (self._ones, self.output) if t is not None]

    @staticmethod
    def predict_nbytes_extra(batch: int, kv_heads: int, capacity: int, recent: int, shared: bool,
                             state_itemsizes: list[int], dtype: torch.dtype, groups: int = 0, value_dim: int = 0) -> int:
        """Bytes besides keys and values: positions, scores, index entries, one zero, per-token state (``capacity``
        slots; ``state_itemsizes`` lists the spares of stepped state too), and once attention reported
        (``groups > 0``), ``groups`` ones and the ``[batch, 1, kv_heads * groups, value_dim]`` output buffer
        (``groups=0``: a strategy that needs no attention)."""
        rows = 1 if shared else kv_heads
        state = sum(size * batch * kv_heads * capacity for size in state_itemsizes)
        held = 8 * batch * rows * capacity + 4 * batch * rows * capacity + 8 * (recent + 2) * batch * rows
        output = batch * kv_heads * groups * value_dim * dtype.itemsize  # the attention output buffer
        return held + dtype.itemsize + state + 4 * groups + output

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows (beam search): rows move with their slots, positions and state."""
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.pos, self.score = self.pos.index_select(0, index), self.score.index_select(0, index)
        self.entries = self.entries.index_select(1, index)
        self.spare = {name: t.index_select(0, index) for name, t in self.spare.items()}
        self.extra = {name: t.index_select(0, index) if t.dim() >= 3 else t for name, t in self.extra.items()}
        self.state = {name: self.extra[self.state_in_extra[name][0]].select(2, self.state_in_extra[name][1])
                      if name in self.state_in_extra else t.index_select(0, index) for name, t in self.state.items()}
        ones, output = self._ones, self.output
        self._views()
        if ones is not None:  # made again for the new rows, so the bytes held stay what predict_nbytes says
            self.ones(ones.shape[-1])
        if output is not None:
            self.output_buffer(output.shape[2], output.shape[3])
