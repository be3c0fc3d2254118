"""Slot storage of the score-based caches: decoding in slots keeps exactly the tokens position order keeps.

Each test runs the same inputs twice, once as shipped (a full layer decodes in a ``SlotStore``) and
once with slot storage turned off on every layer (the position-ordered rule of ``EvictingLayer._select``),
and compares greedy tokens, logits and the positions kept.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.storage.slots import PROTECTED, SlotStore

SLOTTED = ["keynorm", "h2o", "tova", "snapkv"]
SETTINGS = [
    {"budget": 10},
    {"budget": 10, "num_sink_tokens": 2, "recent_window": 3},
    {"budget": 12, "num_sink_tokens": 1, "per_head": False, "recent_window": 4},
    {"budget": 9, "recent_window": 0},
]


def _make(name, model, **kwargs):
    """``make_cache`` at the small budgets of these tests: snapkv's default window (32) would fill them (refused)."""
    if name == "snapkv" and "window" not in kwargs:
        kwargs["window"] = 4
    return hf_kvplus.make_cache(name, model, **kwargs)


def _cache(name, model, slots: bool, **kwargs):
    cache = _make(name, model, **kwargs)
    if not slots:
        for layer in cache.layers:
            layer.uses_score_slots = lambda: False
    return cache


@torch.no_grad()
def _decode(model, cache, ids, steps, between=None):
    out = model(ids, **cache_kwargs(cache, model), use_cache=True)
    tokens, logits = [], []
    for step in range(steps):
        if between is not None:
            between(step, cache)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        logits.append(out.logits[:, -1])
        out = model(token, **cache_kwargs(cache, model), use_cache=True)
    return torch.cat(tokens, dim=1), torch.stack(logits)


def _same_positions(got, expected):
    for a, b in zip(got.layers, expected.layers, strict=True):
        assert torch.equal(a.pos.expand_as(b.pos), b.pos)


@pytest.mark.parametrize("name", SLOTTED)
@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(f"{n}{v}" for n, v in k.items()))
def test_a_long_decode_in_slots_equals_position_order(name, kwargs):
    model = tiny_model("llama-gqa")
    ids = prompt(length=24, seed=3)
    slotted = _cache(name, model, True, **kwargs)
    ordered = _cache(name, model, False, **kwargs)
    tokens, logits = _decode(model, slotted, ids, 80)
    assert all(isinstance(layer.store, SlotStore) for layer in slotted.layers)
    expected_tokens, expected_logits = _decode(model, ordered, ids, 80)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    _same_positions(slotted, ordered)
    assert slotted.max_held == ordered.max_held == kwargs["budget"]
    for a, b in zip(slotted.layers, ordered.layers, strict=True):
        for state, value in b.token_state.items():
            torch.testing.assert_close(a.token_state[state], value, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_ties_evict_the_older_token():
    """Keys of equal norm tie everywhere: slots evict the oldest candidate, as a sliding window would."""
    model = tiny_model("llama-gqa")
    heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    for slots in (True, False):
        cache = _cache("keynorm", model, slots, budget=8, num_sink_tokens=2, recent_window=2)
        layer = cache.layers[0]
        for position in range(40):
            key = torch.zeros(1, heads, 1, head_dim)
            key[..., (position * 7) % head_dim] = 1.0  # norm exactly 1, in a different channel each time
            layer.update(key, torch.randn(1, heads, 1, head_dim))
        assert isinstance(layer.store, SlotStore) == slots
        assert layer.pos[0, 0].tolist() == [0, 1, 34, 35, 36, 37, 38, 39]


def test_the_slot_key_orders_by_score_then_age():
    """Equal scores in slots whose order differs from the tokens' order: the oldest one goes first."""
    keys = torch.zeros(1, 1, 6, 2)
    pos = torch.tensor([[[0, 3, 5, 9, 11, 12]]])
    mass = torch.tensor([[[9.0, 0.5, 0.25, 0.25, 0.5, 7.0]]])
    slots = SlotStore(keys, keys, pos, {"mass": mass}, sinks=1, recent=1, shared=False, seen=13)
    # scramble: token 13 goes into the free slot, then compare with equal scores in reversed slot order
    slots.write(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 13)
    slots.write_state("mass", 0.25, 13)
    slots.state["mass"][..., 1:4] = torch.tensor([0.25, 0.25, 0.25])  # tokens 3, 5, 9 tie
    slots.release()
    slots.evict("mass", 1)  # token 12 left the window (mass 7): candidates 3, 5, 9, 11, 12
    assert slots.order().tolist() == [[[0, 2, 3, 4, 5, 6]]]  # token 3 (slot 1) evicted
    assert (slots.pos < PROTECTED).sum() == 5  # the sink and token 13 are protected
    slots.write(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 14)
    slots.write_state("mass", 1.0, 14)
    slots.release()
    slots.evict("mass", 1)
    assert slots.positions()[0, 0].tolist() == [0, 9, 11, 12, 13, 14]  # then token 5, older than 9


@pytest.mark.parametrize("name", SLOTTED)
def test_crop_and_batch_operations_leave_or_keep_slots_consistently(name):
    """Beam-style reordering and row selection in slot storage, a crop inside the recent window (which leaves
    slot storage), then decoding again: tokens and positions equal the position-ordered cache's."""
    model = tiny_model("llama-gqa")
    ids = prompt(batch=3, length=20, seed=5)

    def between(step, cache):
        if step == 10:
            cache.reorder_cache(torch.tensor([2, 0, 0]))
        if step == 20:
            cache.batch_select_indices(torch.tensor([True, False, True]))
        if step == 25:
            cache.batch_repeat_interleave(2)
        if step == 30:
            cache.crop(-2)  # the newest 2 tokens are in the recent window: allowed

    results = []
    for slots in (True, False):
        cache = _cache(name, model, slots, budget=10, recent_window=4)
        logits = []
        with torch.no_grad():
            model(ids, **cache_kwargs(cache, model), use_cache=True)
            for step in range(40):
                between(step, cache)
                token = torch.full((cache.layers[0].batch_size, 1), (step * 7) % 80 + 3)
                logits.append(model(token, **cache_kwargs(cache, model), use_cache=True).logits[:, -1])
        results.append((logits, cache))
    (logits, slotted), (expected_logits, ordered) = results
    for got, expected in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _same_positions(slotted, ordered)
    assert all(isinstance(layer.store, SlotStore) for layer in slotted.layers)


@pytest.mark.parametrize("name", SLOTTED)
@torch.no_grad()
def test_beam_search_and_assisted_decoding_match_position_order(name):
    model = hf_kvplus.attach(tiny_model("llama-gqa"), attention_scores=True)  # drafts verified in "kvplus" attention
    ids = prompt(length=24, seed=2).repeat(1, 2)
    outputs = []
    for slots in (True, False):
        beams = model.generate(ids, max_new_tokens=24, num_beams=3, do_sample=False,
                               **cache_kwargs(_cache(name, model, slots, budget=16), model))
        lookup = model.generate(ids, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=3,
                                **cache_kwargs(_cache(name, model, slots, budget=16), model))
        outputs.append((beams, lookup))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("name", SLOTTED)
def test_autograd_keeps_position_order(name):
    model = tiny_model("llama-gqa")
    cache = _make(name, model, budget=8)
    loss = model(prompt(length=20), **cache_kwargs(cache, model), use_cache=True).logits.sum()
    for step in range(3):
        loss = loss + model(prompt(length=1, seed=step), **cache_kwargs(cache, model), use_cache=True).logits.sum()
    loss.backward()
    assert all(not isinstance(layer.store, SlotStore) for layer in cache.layers) and cache.max_held == 8


@pytest.mark.parametrize("name", SLOTTED)
@torch.no_grad()
def test_bytes_held_equal_the_prediction_right_after_prefill_and_after_a_reorder(name):
    model = tiny_model("llama-gqa")
    cache = _make(name, model, budget=10)
    model(prompt(batch=2, length=24), **cache_kwargs(cache, model), use_cache=True)
    assert all(isinstance(layer.store, SlotStore) for layer in cache.layers)
    predicted = _make(name, model.config, budget=10).predict_nbytes(24, batch=2)
    assert hf_kvplus.cache_nbytes(cache) == predicted
    cache.reorder_cache(torch.tensor([1, 0]))
    assert hf_kvplus.cache_nbytes(cache) == predicted
