"""Budgets that follow the scores (issue 17, item 1): AdaKV head-wise budgets and PyramidKV layer budgets.

``budget_allocation="adaptive"`` (arXiv:2407.11550) and ``layer_budgets="pyramid"`` (arXiv:2406.02069) are options
of every scored strategy (:class:`~hf_kvplus.eviction.scorers.h2o.ScoredCache`). Checked here for each scored
strategy: the layer and head totals, the bytes held, exact equality with the uniform choice when the option gives
every head (layer) the same budget, unused entries never reaching attention, refusals, rollback of a refused
forward, left padding, and a decoding step without host reads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import prompt, tiny_model
from test_conformance import _reachable_tensor_bytes
from test_decode_ops import SYNC_OPS, _Count
from test_refusal_rollback import refused_forward_rolls_back

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.eviction.scorers.h2o import pyramid_budgets

BUDGET = 12
# scored strategy -> keywords it needs at a small budget (TOVA averages its heads unless told per_head=True)
SCORED = {"h2o": {}, "tova": {"per_head": True}, "keynorm": {}, "snapkv": {"window": 4}}
OPTIONS = {
    "adaptive": {"budget_allocation": "adaptive"},
    "pyramid": {"layer_budgets": "pyramid", "pyramid_beta": 4},
    "adaptive+pyramid": {"budget_allocation": "adaptive", "layer_budgets": "pyramid", "pyramid_beta": 4},
}
VARIANTS = [pytest.param(name, option, id=f"{name}-{option}") for name in SCORED for option in OPTIONS]


def _make(model, name: str, budget: int = BUDGET, **options):
    return hf_kvplus.make_cache(name, model, budget=budget, **SCORED[name], **options)


def _fill(model, cache, ids, prefill: int = 20):
    """Prefill ``prefill`` tokens then decode the rest one at a time; returns every forward's logits."""
    outputs = [model(ids[:, :prefill], **cache_kwargs(cache), use_cache=True).logits]
    for column in range(prefill, ids.shape[1]):
        outputs.append(model(ids[:, column : column + 1], **cache_kwargs(cache), use_cache=True).logits)
    return outputs


# ----------------------------------------------------------------------------------------------------- pyramid
@pytest.mark.parametrize(("budget", "layers", "beta", "minimum"), [(100, 4, 5, 1), (205, 30, 20, 22), (12, 2, 4, 3),
                                                                   (7, 5, 1, 1), (512, 30, 20, 52)])
def test_pyramid_budgets_sum_to_the_uniform_total_and_decrease(budget, layers, beta, minimum):
    budgets = pyramid_budgets(budget, layers, beta, minimum)
    assert sum(budgets) == layers * budget
    assert budgets == sorted(budgets, reverse=True)
    assert min(budgets) >= min(budget, minimum)
    if beta == 1:
        assert budgets == [budget] * layers
    else:
        assert budgets[0] > budget > budgets[-1]


@pytest.mark.parametrize("name", SCORED)
@torch.no_grad()
def test_pyramid_layers_evict_to_their_own_budgets(name):
    model = tiny_model("qwen2-mqa")  # three layers
    cache = _make(model, name, layer_budgets="pyramid", pyramid_beta=4)
    budgets = [layer.budget for layer in cache.layers]
    assert sum(budgets) == BUDGET * len(budgets) and budgets[0] > budgets[-1]
    _fill(model, cache, prompt(length=40, seed=1))
    assert [layer.kept for layer in cache.layers] == budgets
    assert cache.max_held == max(budgets)


# ---------------------------------------------------------------------------------------------------- adaptive
@pytest.mark.parametrize("name", SCORED)
@torch.no_grad()
def test_adaptive_with_equal_head_budgets_gives_the_uniform_logits(name):
    """head_floor=1 gives every head its whole budget by its own ranking: the uniform choice, to float rounding
    (the adaptive layer decodes in the dense path with a per-head mask, the uniform one in slot storage)."""
    model = tiny_model("llama-gqa")
    ids = prompt(length=36, seed=2)
    uniform = _fill(model, _make(model, name), ids)
    cache = _make(model, name, budget_allocation="adaptive", head_floor=1.0)
    adaptive = _fill(model, cache, ids)
    for a, b in zip(uniform, adaptive, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert all(layer.head_lengths().eq(BUDGET).all() for layer in cache.layers)


def _uneven_cache(model, name):
    """An adaptive cache whose heads hold different counts (searched over seeds of a random prompt). The keys of
    KV head 0 are scaled up in every layer: its attention is sharper than head 1's (random weights attend evenly)."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.k_proj.weight[: attention.head_dim].mul_(6.0)
    for seed in range(20):
        cache = _make(model, name, budget_allocation="adaptive", head_floor=0.0)
        _fill(model, cache, prompt(length=32, seed=seed), prefill=28)
        if any(layer.head_lengths().unique().numel() > 1 for layer in cache.layers):
            return cache
    pytest.fail(f"{name}: no prompt gave uneven head budgets")


@pytest.mark.parametrize("name", SCORED)
@torch.no_grad()
def test_adaptive_heads_split_the_layer_total_and_bytes_are_the_longest_head(name):
    model = tiny_model("llama-gqa")
    cache = _uneven_cache(model, name)
    for layer in cache.layers:
        lengths = layer.head_lengths()  # [batch, kv_heads]
        heads = layer.num_heads
        assert lengths.sum(dim=-1).tolist() == [heads * BUDGET]  # the layer keeps budget * kv_heads tokens
        protected = layer.num_sink_tokens + layer.recent_window
        assert int(lengths.min()) >= protected  # every head keeps at least its protected tokens
        keys, values = layer.store.get()
        assert keys.shape[2] == layer.kept == int(lengths.max())  # rows as long as the fullest head, no longer
        assert (layer.pos < 0).sum(dim=-1).eq(layer.kept - lengths).all()  # the rest of each row is unused
        row_bytes = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        assert row_bytes == 2 * heads * int(lengths.max()) * layer.head_dim * keys.element_size()
    assert hf_kvplus.cache_nbytes(cache) == _reachable_tensor_bytes(cache)


@pytest.mark.parametrize("name", SCORED)
@torch.no_grad()
def test_unused_entries_never_reach_attention(name):
    """Garbage written into the unused entries of every head changes nothing in the next forwards."""
    model = tiny_model("llama-gqa")
    cache = _uneven_cache(model, name)
    twin = copy.deepcopy(cache)
    for layer in twin.layers:
        unused = (layer.pos < 0).unsqueeze(-1)  # [batch, kv_heads, kept, 1]
        layer.store.keys.masked_fill_(unused, 1e4)
        layer.store.values.masked_fill_(unused, -1e4)
    assert any(bool((layer.pos < 0).any()) for layer in twin.layers)
    ids = prompt(length=6, seed=11)
    for tokens in (ids[:, :4], ids[:, 4:5], ids[:, 5:6]):
        ours = model(tokens, **cache_kwargs(cache), use_cache=True).logits
        garbage = model(tokens, **cache_kwargs(twin), use_cache=True).logits
        torch.testing.assert_close(garbage, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "option"), VARIANTS)
@torch.no_grad()
def test_left_padded_rows_generate_as_alone(name, option):
    model = tiny_model("llama-gqa")
    ids = prompt(batch=2, length=18, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                           **cache_kwargs(_make(model, name, **OPTIONS[option])))
    for row, start in ((0, 0), (1, 7)):
        alone = model.generate(ids[row : row + 1, start:], max_new_tokens=16, do_sample=False,
                               **cache_kwargs(_make(model, name, **OPTIONS[option])))
        assert torch.equal(batch[row, 18:], alone[0, 18 - start :]), f"row {row} differs when padded"


@pytest.mark.parametrize(("name", "option"), VARIANTS)
@pytest.mark.parametrize("step", ["chunk", "decode"])
@torch.no_grad()
def test_a_refused_forward_leaves_every_layer_as_before(name, option, step):
    model = tiny_model("llama-gqa")
    cache = _make(model, name, **OPTIONS[option])
    ids = prompt(length=30, seed=5)
    _fill(model, cache, ids[:, :24])
    refused_forward_rolls_back(model, cache, ids, step)


@pytest.mark.parametrize("name", SCORED)
@torch.no_grad()
def test_an_adaptive_decoding_step_reads_nothing_back(name):
    """A one-token step keeps each head's count: no host read (a reallocation, at a forward of several tokens,
    reads the new row length once)."""
    model = tiny_model("llama-gqa")
    cache = _make(model, name, budget_allocation="adaptive")
    ids = prompt(length=26, seed=4)
    _fill(model, cache, ids[:, :24])
    lengths = [layer.head_lengths() for layer in cache.layers]
    with _Count() as counted:
        model(ids[:, 24:25], **cache_kwargs(cache), use_cache=True)
    assert not SYNC_OPS & set(counted.ops), sorted(SYNC_OPS & set(counted.ops))
    assert all(torch.equal(a, layer.head_lengths()) for a, layer in zip(lengths, cache.layers, strict=True))


# ----------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget_allocation": "greedy"}, r"budget_allocation must be one of \['uniform', 'adaptive'\], got 'greedy'"),
        ({"layer_budgets": "funnel"}, r"layer_budgets must be one of \['uniform', 'pyramid'\], got 'funnel'"),
        ({"budget_allocation": "adaptive", "head_floor": 1.5}, r"head_floor must be a number in \[0, 1\].*1\.5"),
        ({"budget_allocation": "adaptive", "head_floor": True}, r"head_floor must be a number in \[0, 1\].*True"),
        ({"layer_budgets": "pyramid", "pyramid_beta": 0.5}, r"pyramid_beta must be a number >= 1.*0\.5"),
        ({"budget_allocation": "adaptive", "per_head": False}, r"needs per_head=True, got per_head=False"),
        ({"budget_allocation": "adaptive", "nbits": 4}, r"dense storage only; got nbits=4"),
    ],
)
def test_bad_settings_are_refused_before_anything_changes(options, message):
    model = tiny_model("llama-gqa")
    attention = model.config._attn_implementation
    with pytest.raises(ValueError, match=message):
        hf_kvplus.make_cache("h2o", model, budget=BUDGET, **options)
    assert model.config._attn_implementation == attention  # refused before the model was touched


def test_adaptive_keynorm_attaches_the_masking_attention():
    """key norm needs no attention scores, but adaptive budgets need the per-head mask of the "kvplus" attention."""
    model = tiny_model("llama-gqa")
    cache = hf_kvplus.make_cache("keynorm", model, budget=BUDGET, budget_allocation="adaptive")
    assert cache.needs_attention
    _fill(model, cache, prompt(length=30, seed=6))
    assert all(int(layer.head_lengths().sum()) == layer.num_heads * BUDGET for layer in cache.layers)


@pytest.mark.parametrize(("name", "option"), VARIANTS)
@torch.no_grad()
def test_forwards_of_several_tokens_with_a_mask_as_without(name, option):
    """Layers of different lengths share one mask built for the longest: each takes its last columns (exact)."""
    model = tiny_model("llama-gqa")
    ids = prompt(length=40, seed=8)
    logits = []
    for masked in (False, True):
        cache = _make(model, name, **OPTIONS[option])
        outputs = []
        for start, stop in ((0, 20), (20, 26), (26, 27), (27, 33), (33, 34)):
            extra = {"attention_mask": torch.ones(1, stop, dtype=torch.long)} if masked else {}
            outputs.append(model(ids[:, start:stop], **cache_kwargs(cache), use_cache=True, **extra).logits)
        assert len({layer.kept for layer in cache.layers}) > 1 or option == "adaptive"
        logits.append(outputs)
    for a, b in zip(*logits, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@torch.no_grad()
def test_assisted_decoding_pyramid_as_plain_and_adaptive_refused():
    model = tiny_model("llama-gqa")
    ids = prompt(length=24, seed=9)
    plain = model.generate(ids, max_new_tokens=12, do_sample=False,
                           **cache_kwargs(_make(model, "h2o", layer_budgets="pyramid", pyramid_beta=4)))
    assisted = model.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3,
                              **cache_kwargs(_make(model, "h2o", layer_budgets="pyramid", pyramid_beta=4)))
    assert torch.equal(assisted, plain)
    with pytest.raises(ValueError, match="verifies draft tokens.*budget_allocation='adaptive'"):
        model.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3,
                       **cache_kwargs(_make(model, "h2o", budget_allocation="adaptive")))


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("mode", [dict(num_beams=3), dict(do_sample=True, top_k=20, num_return_sequences=2),
                                  dict(prefill_chunk_size=5)], ids=["beam", "sampling", "chunked-prefill"])
@torch.no_grad()
def test_generate_modes_keep_the_layer_totals(option, mode):
    model = tiny_model("llama-gqa")
    cache = _make(model, "h2o", **OPTIONS[option])
    torch.manual_seed(0)
    out = model.generate(prompt(length=20), max_new_tokens=15, **{"do_sample": False, **mode}, **cache_kwargs(cache))
    assert out.shape[1] == 35
    for layer in cache.layers:
        assert (layer.head_lengths().sum(dim=-1) <= layer.num_heads * layer.budget).all()
