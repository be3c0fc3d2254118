"""Property-based tests of the eviction base: random prefill chunks, decode steps, beam reorders,
crops and batch selections, checked against a slow reference implementation of the keep rule."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_kvplus

HEADS, DIM = 2, 4
CONFIG = tiny_model("llama-gqa").config


class Reference:
    """What a sink cache must hold, row by row: ``{position: key}`` of the tokens it keeps."""

    def __init__(self, batch: int, budget: int, sinks: int, pad_len: list[int]):
        self.rows = [dict() for _ in range(batch)]
        self.budget, self.sinks, self.pad_len, self.seen = budget, sinks, list(pad_len), 0

    def append(self, keys: torch.Tensor) -> None:  # keys [batch, heads, q, dim]
        for b, row in enumerate(self.rows):
            for i in range(keys.shape[2]):
                row[self.seen + i] = keys[b, :, i]
        self.seen += keys.shape[2]
        for b, row in enumerate(self.rows):
            if len(row) <= self.budget:
                continue
            real = sorted(p for p in row if p >= self.pad_len[b])
            pads = sorted(p for p in row if p < self.pad_len[b])
            if len(real) >= self.budget:
                keep = set(real[: self.sinks]) | set(real[len(real) - (self.budget - self.sinks) :])
            else:
                # which pads stay changes no output; the base keeps the newest (ties drop the oldest first)
                keep = set(real) | set(pads[len(pads) - (self.budget - len(real)) :])
            self.rows[b] = {p: row[p] for p in sorted(keep)}

    def select(self, index: list[int]) -> None:
        self.rows = [dict(self.rows[i]) for i in index]
        self.pad_len = [self.pad_len[i] for i in index]

    def crop(self, drop: int) -> bool:
        if any(not all(p in row for p in range(self.seen - drop, self.seen)) for row in self.rows):
            return False
        self.rows = [{p: k for p, k in row.items() if p < self.seen - drop} for row in self.rows]
        self.seen -= drop
        return True


operation = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 9)),
    st.tuples(st.just("append"), st.just(1)),
    st.tuples(st.just("reorder"), st.integers(0, 10_000)),
    st.tuples(st.just("crop"), st.integers(1, 6)),
    st.tuples(st.just("select"), st.integers(0, 10_000)),
    st.tuples(st.just("repeat"), st.integers(1, 2)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.integers(3, 12),
    sinks=st.integers(0, 3),
    pads=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    operations=st.lists(operation, min_size=1, max_size=14),
    seed=st.integers(0, 2**16),
)
def test_sink_cache_keeps_what_the_reference_keeps(budget, sinks, pads, operations, seed):
    if budget <= sinks:
        sinks = budget - 1
    generator = torch.Generator().manual_seed(seed)
    cache = hf_kvplus.SinkCache(CONFIG, budget=budget, num_sink_tokens=sinks, rerotate_keys=False)
    layer = cache.layers[0]
    reference = Reference(len(pads), budget, sinks, pads)
    first = max(pads) + 1
    mask = torch.tensor([[0] * p + [1] * (first - p) for p in pads])
    operations = [("append", first)] + list(operations)
    for step, (kind, arg) in enumerate(operations):
        batch = len(reference.rows)
        if kind == "append":
            keys = torch.randn(batch, HEADS, arg, DIM, generator=generator)
            if step == 0:  # the first forward's padding mask (not again after a crop to zero, for another batch)
                cache.observe_inputs(mask, arg)
            else:
                cache.observe_inputs(None, arg)
            kept_before = layer.kept
            kv_length, kv_offset = cache.get_mask_sizes(arg, 0)
            returned, values = cache.update(keys, keys * 2, 0)
            assert returned.shape[2] == kv_length == kept_before + arg  # what the mask was told
            assert kv_offset == reference.seen - kept_before
            assert torch.equal(values, returned * 2)
            reference.append(keys)
        elif kind in ("reorder", "select"):
            g = torch.Generator().manual_seed(arg)
            size = batch if kind == "reorder" else int(torch.randint(1, batch + 1, (1,), generator=g))
            index = torch.randint(0, batch, (size,), generator=g)
            (cache.reorder_cache if kind == "reorder" else cache.batch_select_indices)(index)
            reference.select(index.tolist())
        elif kind == "repeat":
            cache.batch_repeat_interleave(arg)
            reference.select([b for b in range(batch) for _ in range(arg)])
        elif kind == "crop":
            drop = min(arg, reference.seen)
            possible = reference.crop(drop)
            if possible:
                cache.crop(-drop)
            else:
                with pytest.raises(ValueError, match="already evicted"):
                    cache.crop(-drop)
        # invariants after every operation
        assert cache.get_seq_length() == reference.seen
        assert layer.kept <= budget
        keys = layer.keys
        pos = layer.pos.expand(len(reference.rows), HEADS, layer.kept)
        for b, row in enumerate(reference.rows):
            assert layer.kept == len(row)
            for h in range(HEADS):
                held = pos[b, h].tolist()
                assert held == sorted(held)
                real = [p for p in held if p >= reference.pad_len[b]]
                assert real == [p for p in sorted(row) if p >= reference.pad_len[b]]
                for slot, p in enumerate(held):
                    if p >= reference.pad_len[b]:
                        assert torch.equal(keys[b, h, slot], row[p][h])
        assert hf_kvplus.cache_nbytes(cache) == sum(
            t.untyped_storage().nbytes() for t in layer.tensors()
        ) + sum(t.untyped_storage().nbytes() for other in cache.layers[1:] for t in other.tensors())
