"""The conformance suite: every registered cache, on tiny random models of three architectures.

A strategy gets all of these checks by being registered (``hf_kvplus.register_cache``):

* unlimited budget: logits match ``DynamicCache`` and greedy tokens are identical;
* with a budget: no layer ever holds more than the budget between forwards, in every mode;
* ``generate`` works for greedy, sampling, beam search and a left-padded batch (a padded row
  generates exactly what it generates alone, so padding never leaks into attention);
* continuing generation from a returned cache equals generating in one call;
* ``cache_nbytes`` equals the bytes of every tensor reachable from the cache.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import ARCHITECTURES, prompt, tiny_model
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import hf_kvplus
from hf_kvplus._compat import cache_kwargs, output_cache

# Registered presets whose options take other code paths than their strategy's sweep (rotated keys, sinks, keys
# before RoPE, keys and values of different widths) run every check too.
OPTION_PRESETS = ["int2r", "int2rp", "k4v2"]
NAMES = hf_kvplus.list_caches() + OPTION_PRESETS
EVICTING = [name for name in NAMES if hf_kvplus.get_spec(name).evicting]
UNLIMITED = 10_000
BUDGET = 12
# name -> (make_cache keywords, absolute logit tolerance) under which an unlimited cache must reproduce DynamicCache.
# int8 measured max |logit diff| 3.4e-4 (int4: 8e-3, so int4 would fail this parity).
PARITY = {"quantized": (dict(nbits=8, group_size=4, residual_length=4), 1e-3)}
PARITY.update({name: (dict(nbits=8, key_bits=8, value_bits=8, group_size=4, residual_length=4), 1e-3)
               for name in OPTION_PRESETS})
# Keywords a strategy needs at a small budget: snapkv's default observation window (32) would fill it (refused).
SMALL_BUDGET = {"snapkv": {"window": 4}}
# (name, budget): every cache unlimited, and every evicting cache under a small budget.
CASES = [pytest.param(name, None, id=f"{name}-unlimited") for name in NAMES] + [
    pytest.param(name, BUDGET, id=f"{name}-budget") for name in EVICTING
]


def build(name: str, model, budget: int | None = None):
    spec = hf_kvplus.get_spec(name)
    kwargs = dict(PARITY.get(name, ({}, 0))[0]) if budget is None else {}
    if spec.evicting:
        kwargs["budget"] = UNLIMITED if budget is None else budget
    if budget is not None:
        kwargs.update(SMALL_BUDGET.get(name, {}))
    return hf_kvplus.make_cache(name, model, **kwargs)


class BudgetProbe(LogitsProcessor):
    """Checks the cache after every forward of ``generate`` (logits processors run after the forward)."""

    def __init__(self, cache, budget: int):
        self.cache, self.budget, self.calls = cache, budget, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        for layer in self.cache.layers:
            assert layer.kept <= self.budget, f"layer holds {layer.kept} tokens, budget {self.budget}"
        assert self.cache.get_seq_length() == input_ids.shape[1] - 1 or self.cache.get_seq_length() == input_ids.shape[1]
        return scores


def _steps(model, cache, ids, decode_steps=10, chunks=(16,)):
    """Prefill ``ids`` in chunks then greedy-decode; returns every forward's last logits."""
    outputs, start = [], 0
    for size in (*chunks, ids.shape[1]):
        if start >= ids.shape[1]:
            break
        logits = model(ids[:, start : start + size], **cache_kwargs(cache), use_cache=True).logits
        outputs.append(logits)
        start += size
    token = logits[:, -1:].argmax(-1)
    for _ in range(decode_steps):
        logits = model(token, **cache_kwargs(cache), use_cache=True).logits
        outputs.append(logits)
        token = logits[:, -1:].argmax(-1)
    return outputs


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_unlimited_budget_matches_dynamic_cache(name, model):
    spec = hf_kvplus.get_spec(name)
    ids = prompt(length=24)
    reference = _steps(model, DynamicCache(config=model.config), ids)
    ours = _steps(model, build(name, model), ids)
    atol = PARITY.get(name, ({}, 0))[1] or 1e-5
    for expected, got in zip(reference, ours, strict=True):
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
    greedy_ref = model.generate(ids, max_new_tokens=20, do_sample=False, **cache_kwargs(DynamicCache(config=model.config)))
    greedy = model.generate(ids, max_new_tokens=20, do_sample=False, **cache_kwargs(build(name, model)))
    assert torch.equal(greedy, greedy_ref)


@pytest.mark.parametrize("name", EVICTING)
@pytest.mark.parametrize(
    "mode",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=20, num_return_sequences=2),
        dict(num_beams=3, do_sample=False),
        dict(prefill_chunk_size=5, do_sample=False),
    ],
    ids=["greedy", "sampling", "beam", "chunked-prefill"],
)
@torch.no_grad()
def test_budget_is_never_exceeded(name, mode, model):
    cache = build(name, model, budget=BUDGET)
    probe = BudgetProbe(cache, BUDGET)
    ids = prompt(length=20)
    torch.manual_seed(0)
    out = model.generate(
        ids, max_new_tokens=25, **cache_kwargs(cache), logits_processor=LogitsProcessorList([probe]), **mode
    )
    assert probe.calls == 25
    assert out.shape[1] == 45
    assert cache.get_seq_length() == 44  # logical length keeps counting
    assert cache.max_held <= BUDGET
    assert max(layer.kept for layer in cache.layers) == BUDGET


@pytest.mark.parametrize(("name", "budget"), CASES)
@torch.no_grad()
def test_left_padded_rows_generate_as_alone(name, budget, model):
    ids = prompt(batch=2, length=18, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    batch = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, **cache_kwargs(build(name, model, budget))
    )
    for row, start in ((0, 0), (1, 7)):
        alone = model.generate(
            ids[row : row + 1, start:], max_new_tokens=20, do_sample=False, **cache_kwargs(build(name, model, budget))
        )
        assert torch.equal(batch[row, 18:], alone[0, 18 - start :]), f"row {row} differs when padded"


@pytest.mark.parametrize(("name", "budget"), CASES)
@torch.no_grad()
def test_continue_from_returned_cache(name, budget, model):
    ids = prompt(length=16, seed=5)
    once = model.generate(ids, max_new_tokens=24, do_sample=False, **cache_kwargs(build(name, model, budget)))
    first = model.generate(
        ids, max_new_tokens=10, do_sample=False, **cache_kwargs(build(name, model, budget)), return_dict_in_generate=True
    )
    second = model.generate(
        first.sequences, max_new_tokens=14, do_sample=False, **cache_kwargs(output_cache(first))
    )
    assert torch.equal(second, once)


def _reachable_tensor_bytes(cache) -> int:
    """Independent of ``cache_nbytes``: walk every object reachable through the garbage collector."""
    seen, storages, stack = set(), {}, [cache]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (torch.nn.Module, type)) or callable(obj) and not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


@pytest.mark.parametrize(("name", "budget"), CASES)
@torch.no_grad()
def test_cache_nbytes_counts_every_tensor_held(name, budget, model):
    cache = build(name, model, budget)
    model.generate(prompt(batch=2, length=20), max_new_tokens=9, do_sample=False, **cache_kwargs(cache))
    held = hf_kvplus.cache_nbytes(cache)
    assert held > 0
    assert held == _reachable_tensor_bytes(cache)


def test_every_architecture_is_exercised():
    assert set(ARCHITECTURES) == {"llama-gqa", "gpt-neox", "qwen2-mqa"}
    assert "dynamic" in NAMES and "sink" in NAMES
    assert tiny_model("llama-gqa").config.num_key_value_heads < tiny_model("llama-gqa").config.num_attention_heads


def test_spec_flags_are_derived_from_the_policy_class():
    """A policy states its flags once, in its class: ``CacheSpec`` reads budget/rope arguments and ``needs_attention``."""
    expected = {"sink": (True, False, True), "h2o": (True, True, False), "keynorm": (True, False, False),
                "quantized": (False, False, False), "prefix": (False, False, False)}
    for name, flags in expected.items():
        spec = hf_kvplus.get_spec(name)
        assert (spec.evicting, spec.attention_scores, spec.uses_rope) == flags, name

    class NoBudget(hf_kvplus.KVPlusCache):
        pass

    derived = hf_kvplus.CacheSpec(name="x", factory=hf_kvplus.HeavyHitterCache, description="")
    assert (derived.evicting, derived.attention_scores) == (True, True)
    assert hf_kvplus.CacheSpec(name="y", factory=NoBudget, description="").evicting is False
    assert hf_kvplus.CacheSpec(name="z", factory=NoBudget, description="", evicting=True).evicting is True
