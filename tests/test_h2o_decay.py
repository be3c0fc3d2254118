"""H2O with ``decay`` below 1: an exponential moving sum of attention, the same in slots and in position order.

Slot storage ages the mass by ``decay`` per step (one ``baddbmm``); position order ages it by ``decay**n`` per
forward of ``n`` queries, including after slot steps (leaving the slots for a forward of several tokens). Both
must keep the same tokens, and a refused forward must leave the ageing bookkeeping as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import prompt, tiny_model
from test_refusal_rollback import refused_forward_rolls_back
import test_slot_storage
from test_slot_storage import _cache, _same_positions

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.storage.slots import SlotStore

SETTINGS = [
    {"budget": 10, "decay": 0.9},
    {"budget": 12, "num_sink_tokens": 1, "per_head": False, "recent_window": 4, "decay": 0.8},
    {"budget": 10, "decay": 0.95, "normalize": False},
]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(f"{n}{v}" for n, v in k.items()))
def test_decayed_mass_decodes_in_slots_as_in_position_order(kwargs):
    test_slot_storage.test_a_long_decode_in_slots_equals_position_order("h2o", kwargs)


@torch.no_grad()
def test_a_chunk_after_slot_steps_ages_the_mass_by_the_steps_it_did_not_see():
    model = tiny_model("llama-gqa")
    ids = prompt(length=60, seed=4)
    slotted, ordered = (_cache("h2o", model, slots, budget=10, decay=0.9) for slots in (True, False))
    for cache in (slotted, ordered):
        model(ids[:, :20], **cache_kwargs(cache, model), use_cache=True)
        for column in range(20, 40):
            model(ids[:, column : column + 1], **cache_kwargs(cache, model), use_cache=True)
        assert isinstance(cache.layers[0].store, SlotStore) == (cache is slotted)
        model(ids[:, 40:43], **cache_kwargs(cache, model), use_cache=True)  # leaves the slots
        for column in range(43, 60):
            model(ids[:, column : column + 1], **cache_kwargs(cache, model), use_cache=True)
    _same_positions(slotted, ordered)
    for a, b in zip(slotted.layers, ordered.layers, strict=True):
        torch.testing.assert_close(a.token_state["mass"], b.token_state["mass"], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_the_decayed_mass_is_the_decayed_sum_of_each_query_attention():
    """Token by token, without eviction: mass = sum over queries of decay**(queries after it) * attention."""
    model = tiny_model("llama-gqa")
    ids = prompt(length=16, seed=5)
    decay = 0.7
    cache = hf_kvplus.make_cache("h2o", model, budget=64, decay=decay)
    for column in range(16):
        model(ids[:, column : column + 1], **cache_kwargs(cache, model), use_cache=True)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attentions = eager(ids, output_attentions=True).attentions  # [batch, q_heads, 16, 16] per layer
    weights = decay ** torch.arange(15, -1, -1.0)  # query q counts decay**(15 - q)
    for layer, probs in zip(cache.layers, attentions, strict=True):
        groups = probs.shape[1] // layer.num_heads
        per_kv = probs.view(1, layer.num_heads, groups, 16, 16).mean(dim=2)  # [batch, kv_heads, queries, keys]
        expected = (per_kv * weights[:, None]).sum(dim=2)
        torch.testing.assert_close(layer.token_state["mass"], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("step", ["chunk", "decode"])
@torch.no_grad()
def test_a_refused_forward_leaves_the_decayed_state_as_before(step):
    model = tiny_model("llama-gqa")
    cache = hf_kvplus.make_cache("h2o", model, budget=12, decay=0.9)
    ids = prompt(length=30, seed=5)
    model(ids[:, :20], **cache_kwargs(cache), use_cache=True)
    for column in range(20, 24):
        model(ids[:, column : column + 1], **cache_kwargs(cache), use_cache=True)
    refused_forward_rolls_back(model, cache, ids, step)


@pytest.mark.parametrize("decay", [0, -0.5, 1.01, True, "0.9", float("nan")])
def test_a_bad_decay_is_refused_naming_the_value(decay):
    with pytest.raises(ValueError, match=r"decay must be a number in \(0, 1\]"):
        hf_kvplus.make_cache("h2o", tiny_model("llama-gqa"), budget=12, decay=decay)


@torch.no_grad()
def test_assisted_decoding_is_refused_with_a_decayed_mass_and_exact_without():
    model = tiny_model("llama-gqa")
    ids = prompt(length=20, seed=2).repeat(1, 2)
    mode = dict(do_sample=False, max_new_tokens=10, prompt_lookup_num_tokens=3)
    cache = hf_kvplus.make_cache("h2o", model, budget=16, decay=0.9)
    with pytest.raises(ValueError, match=r"verifies draft tokens.*decayed attention mass \(decay=0.9\)"):
        model.generate(ids, **mode, **cache_kwargs(cache))
    assert cache.get_seq_length() == 0  # refused before the prompt entered
    plain = model.generate(ids, do_sample=False, max_new_tokens=10,
                           **cache_kwargs(hf_kvplus.make_cache("h2o", model, budget=16, decay=1.0)))
    assisted = model.generate(ids, **mode, **cache_kwargs(hf_kvplus.make_cache("h2o", model, budget=16, decay=1.0)))
    assert torch.equal(assisted, plain)
