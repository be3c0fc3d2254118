"""Property-based tests of score-based eviction (key-norm, H2O), per head or shared, over full-precision
and packed storage: random prefill chunks, decode steps, beam reorders, batch selections, repeats and
crops, checked after every operation against a slow reference of the keep rule."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_kvplus
from hf_kvplus.attention import take_request

HEADS, DIM = 2, 16
CONFIG = tiny_model("llama-gqa").config


class Reference:
    """Per row and head, ``{position: [key, accumulated mass]}`` of the tokens the rule keeps."""

    def __init__(self, kind, batch, budget, sinks, recent, per_head, pad_len):
        self.kind, self.budget, self.sinks, self.recent, self.per_head = kind, budget, sinks, recent, per_head
        self.rows = [[{} for _ in range(HEADS)] for _ in range(batch)]
        self.pad_len, self.seen = list(pad_len), 0

    def scores(self, b: int, h: int) -> dict[int, torch.Tensor]:
        held = self.rows[b][h]
        if self.kind == "keynorm":
            return {p: -key.float().norm() for p, (key, _) in held.items()}
        return {p: mass / max(1, self.seen - p) for p, (_, mass) in held.items()}  # H2O, normalized

    def append(self, keys: torch.Tensor, mass: torch.Tensor | None) -> None:
        """``keys`` [batch, heads, n, dim]; ``mass`` [batch, heads, held + n] (float32) for H2O."""
        n = keys.shape[2]
        for b, row in enumerate(self.rows):
            for h, held in enumerate(row):
                for i in range(n):
                    held[self.seen + i] = [keys[b, h, i], torch.zeros((), dtype=torch.float32)]
                if mass is not None:
                    for j, p in enumerate(sorted(held)):
                        held[p][1] = held[p][1] + mass[b, h, j]
        self.seen += n
        for b, row in enumerate(self.rows):
            if len(row[0]) <= self.budget:
                continue
            scores = [self.scores(b, h) for h in range(HEADS)]
            if not self.per_head:  # one ranking per row: the mean over heads
                mean = {p: torch.stack([s[p] for s in scores]).mean() for p in scores[0]}
                scores = [mean] * HEADS
            for h in range(HEADS):
                self.rows[b][h] = {p: row[h][p] for p in self._keep(scores[h], self.pad_len[b])}

    def _keep(self, scores: dict, pad: int) -> set[int]:
        real = sorted(p for p in scores if p >= pad)
        pads = sorted(p for p in scores if p < pad)
        if len(real) < self.budget:  # padding goes first; which padding stays changes no output
            return set(real) | set(pads[len(pads) - (self.budget - len(real)):])
        protected = set(real[: self.sinks]) | set(real[len(real) - self.recent :] if self.recent else [])
        rest = sorted((p for p in real if p not in protected), key=lambda p: (float(scores[p]), p))
        return protected | set(rest[len(rest) - (self.budget - len(protected)):])

    def select(self, index: list[int]) -> None:
        self.rows = [[{p: list(v) for p, v in held.items()} for held in self.rows[i]] for i in index]
        self.pad_len = [self.pad_len[i] for i in index]

    def crop(self, drop: int) -> bool:
        newest = range(self.seen - drop, self.seen)
        if any(p not in held for row in self.rows for held in row for p in newest):
            return False
        self.rows = [[{p: v for p, v in held.items() if p < self.seen - drop} for held in row] for row in self.rows]
        self.seen -= drop
        return True


operation = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 7)),
    st.tuples(st.just("append"), st.just(1)),
    st.tuples(st.just("reorder"), st.integers(0, 10_000)),
    st.tuples(st.just("select"), st.integers(0, 10_000)),
    st.tuples(st.just("repeat"), st.integers(1, 2)),
    st.tuples(st.just("crop"), st.integers(1, 4)),
)


@pytest.mark.parametrize("storage", ["dense", "int8"])
@pytest.mark.parametrize("kind", ["keynorm", "h2o"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(
    budget=st.integers(3, 10),
    sinks=st.integers(0, 2),
    recent=st.integers(0, 3),
    per_head=st.booleans(),
    pads=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    operations=st.lists(operation, min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_scored_cache_keeps_what_the_reference_keeps(kind, storage, budget, sinks, recent, per_head, pads, operations,
                                                     seed):
    sinks = min(sinks, budget - 1)
    recent = min(recent, budget - sinks - 1)  # at least one token kept by score (else refused: degenerate)
    packed = dict(nbits=8, group_size=2, residual_length=2) if storage == "int8" else {}
    cache_class = hf_kvplus.KeyNormCache if kind == "keynorm" else hf_kvplus.HeavyHitterCache
    if kind == "h2o":  # the reference sums every query alike (decay=1; decay < 1 is tests/test_h2o_decay.py)
        packed["decay"] = 1.0
    cache = cache_class(CONFIG, budget=budget, num_sink_tokens=sinks, recent_window=recent, per_head=per_head, **packed)
    layer = cache.layers[0]
    generator = torch.Generator().manual_seed(seed)
    reference = Reference(kind, len(pads), budget, sinks, recent, per_head, pads)
    first = max(pads) + 1
    mask = torch.tensor([[0] * p + [1] * (first - p) for p in pads])
    for step, (op, arg) in enumerate([("append", first)] + list(operations)):
        batch = len(reference.rows)
        if op == "append":
            cache.observe_inputs(mask if step == 0 else None, arg)  # the padding mask of the first forward
            keys = torch.randn(batch, HEADS, arg, DIM, generator=generator)
            held_before = layer.kept
            kv_length, kv_offset = cache.get_mask_sizes(arg, 0)
            returned, _ = cache.update(keys, -keys, 0)
            assert returned.shape[2] == kv_length == held_before + arg and kv_offset == reference.seen - held_before
            mass = None
            if kind == "h2o":  # what the "kvplus" attention would hand over: mass per held key
                mass = torch.rand(batch, HEADS, held_before + arg, generator=generator)
                assert take_request(0) is layer
                layer.observe_attention(mass, "sum")
            reference.append(keys, mass)
        elif op in ("reorder", "select"):
            g = torch.Generator().manual_seed(arg)
            size = batch if op == "reorder" else int(torch.randint(1, batch + 1, (1,), generator=g))
            index = torch.randint(0, batch, (size,), generator=g)
            (cache.reorder_cache if op == "reorder" else cache.batch_select_indices)(index)
            reference.select(index.tolist())
        elif op == "repeat":
            cache.batch_repeat_interleave(arg)
            reference.select([b for b in range(batch) for _ in range(arg)])
        else:
            drop = min(arg, reference.seen)
            if reference.crop(drop):
                cache.crop(-drop)
            else:
                with pytest.raises(ValueError, match="already evicted"):
                    cache.crop(-drop)
        # invariants after every operation
        rows = len(reference.rows)
        assert cache.get_seq_length() == reference.seen and layer.kept <= budget
        keys = layer.keys
        pos = layer.pos.expand(rows, HEADS, layer.kept)
        for b in range(rows):
            for h in range(HEADS):
                held, expected = pos[b, h].tolist(), reference.rows[b][h]
                assert held == sorted(held) and len(held) == len(expected)
                real = [p for p in held if p >= reference.pad_len[b]]
                assert real == [p for p in sorted(expected) if p >= reference.pad_len[b]]
                for slot, p in enumerate(held):
                    if p >= reference.pad_len[b]:
                        torch.testing.assert_close(keys[b, h, slot], expected[p][0], atol=0.05 if packed else 0, rtol=0)
                        if kind == "h2o":
                            assert float(layer.token_state["mass"][b, h, slot]) == pytest.approx(float(expected[p][1]))
        tensors = [t for other in cache.layers for t in other.tensors()]
        assert hf_kvplus.cache_nbytes(cache) == sum(t.untyped_storage().nbytes() for t in tensors)
