"""Quantized storage under every strategy: ``make_cache(name, model, budget=..., nbits=...)``.

Every evicting strategy in the registry runs the conformance checks again with packed storage;
small groups and residual make sure the conformance prompts really are quantized and evicted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model
from test_conformance import BUDGET, EVICTING, SMALL_BUDGET, BudgetProbe, _reachable_tensor_bytes
from transformers import DynamicCache, LogitsProcessorList

import hf_kvplus
from hf_kvplus._compat import cache_kwargs, output_cache
from hf_kvplus.storage.packed import QuantizedStore

STORAGE = dict(group_size=4, residual_length=4)


def build(name, model, nbits, budget=BUDGET):
    return hf_kvplus.make_cache(name, model, budget=budget, nbits=nbits, **STORAGE, **SMALL_BUDGET.get(name, {}))


@pytest.mark.parametrize("name", EVICTING)
@pytest.mark.parametrize(
    ("nbits", "mode"),
    [(4, dict(do_sample=False)), (2, dict(do_sample=True, top_k=20, num_return_sequences=2)),
     (2, dict(num_beams=3, do_sample=False))],
    ids=["int4-greedy", "int2-sampling", "int2-beam"],
)
@torch.no_grad()
def test_budget_holds_and_memory_is_packed(name, nbits, mode, model):
    # 32 of the 45 tokens: per-head, per-step eviction (tova, keynorm) splits key groups, and at a
    # budget of 12 with 4-token groups the scales and index maps outweigh the packed codes.
    budget = 32
    cache = build(name, model, nbits, budget=budget)
    probe = BudgetProbe(cache, budget)
    torch.manual_seed(0)
    out = model.generate(prompt(length=20), max_new_tokens=25, **cache_kwargs(cache),
                         logits_processor=LogitsProcessorList([probe]), **mode)
    assert out.shape[1] == 45 and cache.max_held <= budget
    stores = [layer.store for layer in cache.layers]
    assert all(isinstance(s, QuantizedStore) and s.nbits == nbits and s.quantized_length > 0 for s in stores)
    held = hf_kvplus.cache_nbytes(cache)
    assert held == _reachable_tensor_bytes(cache)
    rows, heads, _, head_dim = cache.layers[0].store.get()[0].shape
    dense_bytes = sum(2 * rows * heads * layer.kept * head_dim * 4 for layer in cache.layers)  # float32 keys and values
    # what scorers hold beside the keys and values (expected attention's [q_heads, head_dim, head_dim] query second
    # moment per row and layer; per-token scores such as value norms, 4 bytes per token and head against 128 bytes
    # of float32 keys and values at this tiny head_dim) is counted above and left out of the packing comparison
    stats = sum(t.numel() * t.element_size() for layer in cache.layers for t in (getattr(layer, "_qstats", None) or ())
                if t is not None)
    scores = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.token_state.values()
                 if torch.is_tensor(t))
    # sink tokens stay in full precision beside the packed history (expected attention keeps 4 by default)
    sinks = getattr(cache, "num_sink_tokens", 0) * 2 * rows * heads * head_dim * 4 * len(cache.layers)
    assert held - stats - scores - sinks < 0.75 * (dense_bytes - sinks)


@pytest.mark.parametrize("name", EVICTING)
@torch.no_grad()
def test_padded_rows_and_continuation_at_int8(name, model):
    ids = prompt(batch=2, length=18, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                           **cache_kwargs(build(name, model, 8)))
    alone = model.generate(ids[1:, 7:], max_new_tokens=20, do_sample=False, **cache_kwargs(build(name, model, 8)))
    # Each row's key groups start at its first real token and padding never enters a range (test_padding_packed.py).
    assert torch.equal(batch[1, 18:], alone[0, 11:])
    once = model.generate(ids[:1], max_new_tokens=24, do_sample=False, **cache_kwargs(build(name, model, 4)))
    first = model.generate(ids[:1], max_new_tokens=10, do_sample=False, **cache_kwargs(build(name, model, 4)),
                           return_dict_in_generate=True)
    second = model.generate(first.sequences, max_new_tokens=14, do_sample=False, **cache_kwargs(output_cache(first)))
    assert torch.equal(second, once)


@torch.no_grad()
def test_beam_search_at_int8_matches_dynamic_cache():
    """Beam reordering moves packed codes (no round trip): int8 beams equal full-precision beams."""
    model = tiny_model("llama-gqa")
    ids = prompt(batch=2, length=16, seed=4)
    kwargs = dict(max_new_tokens=16, num_beams=3, num_return_sequences=3, do_sample=False)
    expected = model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), **kwargs)
    cache = hf_kvplus.make_cache("quantized", model, nbits=8, **STORAGE)
    assert torch.equal(model.generate(ids, **cache_kwargs(cache), **kwargs), expected)
    assert cache.layers[0].store.quantized_length > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(nbits=3), ValueError, r"nbits must be one of \{8, 4, 2\}, got 3"),
        (dict(nbits=4, group_size=32, residual_length=48), ValueError, r"residual_length \(48\).*group_size \(32\)"),
        (dict(group_size=32), ValueError, r"only apply to quantized storage: also pass nbits"),
        (dict(nbits=4, backend="cuda-magic"), ValueError, r"backend must be one of \['torch'"),
        (dict(nbits=4, store_factory=QuantizedStore), ValueError, "either store_factory or storage keywords"),
    ],
)
@pytest.mark.parametrize("name", ["sink", "quantized"])
def test_storage_arguments_are_checked_at_construction(name, kwargs, error, match):
    model = tiny_model("llama-gqa")
    if name == "quantized" and "nbits" not in kwargs:
        kwargs = dict(kwargs, nbits=None)  # the quantized cache needs nbits
        match = r"nbits must be one of \{8, 4, 2\}, got None"
    if name == "quantized" and "store_factory" in kwargs:
        error, match = TypeError, "unexpected keyword argument.*store_factory"  # its storage is fixed
    with pytest.raises(error, match=match):
        hf_kvplus.make_cache(name, model, **kwargs, **({"budget": 8} if name == "sink" else {}))
