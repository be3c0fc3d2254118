"""Score-based eviction (h2o, tova, keynorm, snapkv): scores, the keep rule, set-up errors, deferral."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model
from transformers import DynamicCache

import hf_kvplus
from hf_kvplus import HeavyHitterCache
from hf_kvplus._compat import cache_kwargs

SCORERS = ["h2o", "tova", "keynorm", "snapkv"]


@torch.no_grad()
def test_h2o_mass_equals_eager_attention_summed_over_queries():
    """Per KV head: probabilities summed over queries and averaged over the group's query heads."""
    model, eager = tiny_model("llama-gqa"), tiny_model("llama-gqa")
    eager.set_attn_implementation("eager")
    ids = prompt(length=20, seed=4)
    cache = hf_kvplus.make_cache("h2o", model, budget=1000, normalize=False, decay=1.0)  # the paper's plain sum
    model(ids[:, :16], **cache_kwargs(cache), use_cache=True)
    model(ids[:, 16:], **cache_kwargs(cache), use_cache=True)
    attentions = eager(ids, output_attentions=True).attentions  # per layer [1, q_heads, 20, 20]
    kv_heads = model.config.num_key_value_heads
    for layer, probs in zip(cache.layers, attentions, strict=True):
        grouped = probs.view(1, kv_heads, -1, 20, 20).mean(dim=2)  # [1, kv_heads, queries, keys]
        torch.testing.assert_close(layer.token_state["mass"], grouped.sum(dim=2), atol=1e-5, rtol=1e-4)


def _reference_keep(pos, scores, budget, sinks, recent):
    """Slow rule, one (row, head) at a time: sinks, then the newest, then the highest scores (ties: newer)."""
    order = sorted(range(len(pos)), key=lambda i: pos[i])
    protected = set(order[:sinks]) | set(order[len(order) - recent :] if recent else [])
    rest = sorted((i for i in order if i not in protected), key=lambda i: (-scores[i], -pos[i]))  # ties: newer kept
    return sorted(pos[i] for i in list(protected) + rest[: budget - len(protected)])


@pytest.mark.parametrize("name", SCORERS)
@pytest.mark.parametrize("per_head", [True, False])
@torch.no_grad()
def test_kept_tokens_are_the_protected_and_highest_scored(name, per_head):
    model = tiny_model("llama-gqa")
    budget, sinks, recent = 10, 2, 3
    cache = hf_kvplus.make_cache(name, model, budget=budget, num_sink_tokens=sinks, recent_window=recent,
                                 per_head=per_head)
    layer = cache.layers[1]
    layer.uses_score_slots = lambda: False  # the rule in position order; slot storage equals it (test_slot_storage.py)
    seen_calls = []
    select = layer._select

    def recording_select(kept):
        scores = layer.score().float()  # [1, kv_heads, kept]
        if not per_head:
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        seen_calls.append((layer.pos.expand_as(scores).clone(), scores.clone()))
        return select(kept)

    layer._select = recording_select
    ids = prompt(length=36, seed=6)
    steps = [(0, 14)] + [(t, t + 1) for t in range(14, 30)] + [(30, 36)]  # prefill, decoding, a chunk
    for start, stop in steps:
        model(ids[:, start:stop], **cache_kwargs(cache), use_cache=True)
        pos, scores = seen_calls[-1]
        for head in range(pos.shape[1]):
            expected = _reference_keep(pos[0, head].tolist(), scores[0, head].tolist(), budget, sinks, recent)
            assert layer.pos.expand(1, pos.shape[1], -1)[0, head].tolist() == expected
    assert len(seen_calls) == len(steps) and cache.max_held == budget
    if not per_head:
        assert (layer.pos == layer.pos[:, :1]).all()


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv"])
def test_scores_never_arriving_raise_instead_of_falling_back_to_recency(name):
    model = tiny_model("llama-gqa")  # never attached: no hook switches to the scoring attention, SDPA reports nothing
    spec = hf_kvplus.get_spec(name)
    small = {"window": 4} if name == "snapkv" else {}  # the default window (32) would fill the budget: refused
    cache = spec.factory(model.config, budget=8, **small)
    with pytest.raises(RuntimeError, match=r"hf_kvplus.attach\(model\)"):
        model(prompt(length=12), **cache_kwargs(cache), use_cache=True)
    hf_kvplus.attach(model)  # the hook switches attention for the forwards carrying a scoring cache
    cache = spec.factory(model.config, budget=8, **small)
    model(prompt(length=12), **cache_kwargs(cache), use_cache=True)
    assert cache.max_held == 8


@torch.no_grad()
def test_h2o_normalize_divides_by_the_queries_that_saw_each_token():
    model = tiny_model("llama-gqa")
    cache = hf_kvplus.make_cache("h2o", model, budget=1000, normalize=True)
    model(prompt(length=12), **cache_kwargs(cache), use_cache=True)
    layer = cache.layers[0]
    seen_by = torch.arange(12, 0, -1).float()  # the first token was seen by 12 queries, the last by 1
    torch.testing.assert_close(layer.score(), layer.token_state["mass"] / seen_by)


@torch.no_grad()
def test_rejected_candidates_attention_does_not_count():
    """Deferred eviction: after crop, the cache equals one that only ever saw the accepted tokens."""
    model = tiny_model("llama-gqa")
    ids = prompt(length=26, seed=8)
    caches = []
    for fed, drop in ((ids[:, 20:26], 4), (ids[:, 20:22], 0)):  # 6 candidates of which 2 accepted / just the 2
        cache = hf_kvplus.make_cache("h2o", model, budget=12)
        model(ids[:, :20], **cache_kwargs(cache), use_cache=True)
        cache.activate_past_recording()
        model(fed, **cache_kwargs(cache), use_cache=True)
        assert cache.layers[0].kept == 12 + fed.shape[1]  # eviction waits for the commit
        cache.crop(-drop)
        caches.append(cache)
    for got, expected in zip(caches[0].layers, caches[1].layers, strict=True):
        assert got.kept == 12 and torch.equal(got.pos, expected.pos)
        torch.testing.assert_close(got.token_state["mass"], expected.token_state["mass"])


@pytest.mark.parametrize("budget", [None, 14])
@torch.no_grad()
def test_assisted_decoding_with_prompt_lookup(budget):
    model = tiny_model("llama-gqa")
    ids = prompt(length=24, seed=2).repeat(1, 2)
    kwargs = {"budget": budget or 10_000}
    plain = model.generate(ids, max_new_tokens=20, do_sample=False, **cache_kwargs(hf_kvplus.make_cache("h2o", model, **kwargs)))
    cache = hf_kvplus.make_cache("h2o", model, **kwargs)
    assisted = model.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4, **cache_kwargs(cache))
    assert cache.layers[0].record_past and cache.get_seq_length() == assisted.shape[1] - 1
    if budget is None:
        assert torch.equal(assisted, plain)
    else:
        assert max(layer.kept for layer in cache.layers) == budget


@torch.no_grad()
def test_chunked_prefill_holds_budget_plus_one_chunk_at_most():
    model = tiny_model("llama-gqa")
    budget, chunk = 16, 8
    cache = hf_kvplus.make_cache("h2o", model, budget=budget)
    during = []  # tokens held when attention reports, just before eviction: the peak of each forward
    for layer in cache.layers:
        observe = layer.observe_attention
        layer.observe_attention = lambda mass, reduction, layer=layer, observe=observe: (
            during.append(layer.kept), observe(mass, reduction))
    ids = prompt(length=70, seed=9)
    out = hf_kvplus.prefill(model, ids, cache, chunk_size=chunk)
    assert out.logits.shape[1] == 70 - 64 and cache.get_seq_length() == 70
    assert max(during) == budget + chunk and cache.max_held == budget
    assert len(during) == 9 * len(cache.layers)
    again = hf_kvplus.make_cache("h2o", model, budget=budget)
    for start in range(0, 70, chunk):
        expected = model(ids[:, start : start + chunk], **cache_kwargs(again), use_cache=True).logits
    torch.testing.assert_close(out.logits, expected)


@torch.no_grad()
def test_prefill_with_left_padding_matches_rows_alone():
    model = tiny_model("llama-gqa")
    ids = prompt(batch=2, length=30, seed=1)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # one chunk of padding: both rows then evict at the same tokens
    batch = hf_kvplus.prefill(model, ids, hf_kvplus.make_cache("h2o", model, budget=12), chunk_size=7, attention_mask=mask)
    alone = hf_kvplus.prefill(model, ids[1:, 7:], hf_kvplus.make_cache("h2o", model, budget=12), chunk_size=7)
    torch.testing.assert_close(batch.logits[1, -1], alone.logits[0, -1], atol=1e-5, rtol=1e-4)


def test_storage_keywords_reach_the_store():
    from hf_kvplus.storage.base import DenseStore

    class Marked(DenseStore):
        pass

    cache = HeavyHitterCache(tiny_model().config, budget=8, store_factory=Marked)
    assert all(layer.store_factory is Marked for layer in cache.layers)
    with pytest.raises(ValueError, match="nbits"):
        HeavyHitterCache(tiny_model().config, budget=8, nbits=3)


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("h2o", dict(budget=0), ValueError, "budget must be an integer >= 1"),
        ("h2o", dict(budget=8, heavy_ratio=1.5), ValueError, r"heavy_ratio must be a number in \[0, 1\]"),
        ("h2o", dict(budget=8, recent_window=6, num_sink_tokens=4), ValueError, "must not exceed the budget"),
        ("h2o", dict(budget=8, per_head="yes"), ValueError, "per_head must be True or False"),
        ("h2o", dict(budget=8, normalize=1), ValueError, "normalize must be True or False"),
        ("h2o", dict(budget=8, windw=3), TypeError, r"unexpected keyword argument\(s\) \['windw'\]"),
        ("snapkv", dict(budget=8, kernel_size=4), ValueError, "kernel_size must be odd"),
        ("snapkv", dict(budget=8, window=0), ValueError, "window must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_named(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        hf_kvplus.get_spec(name).factory(tiny_model().config, **kwargs)


def test_budget_split_defaults():
    config = tiny_model().config
    assert (HeavyHitterCache(config, budget=20).recent_window, HeavyHitterCache(config, budget=20).heavy_budget) == (2, 18)
    assert HeavyHitterCache(config, budget=20, heavy_ratio=0.5).recent_window == 10
    assert hf_kvplus.KeyNormCache(config, budget=10).recent_window == 5
    assert hf_kvplus.TovaCache(config, budget=10).recent_window == 0
    assert hf_kvplus.SnapKVCache(config, budget=100, window=16).recent_window == 16
    assert HeavyHitterCache(config, budget=10, num_sink_tokens=2, heavy_ratio=0.3).heavy_budget == 1


@torch.no_grad()
def test_a_new_scorer_is_a_layer_with_a_score():
    """The docs' 30-line example: values with the largest norm are kept, beside the recent window."""
    from hf_kvplus import EvictingLayer, ScoredCache

    class ValueNormLayer(EvictingLayer):
        def initial_state(self, key_states, value_states):
            return {"value_norm": value_states.float().norm(dim=-1)}

        def score(self):
            return self.token_state["value_norm"]

    class ValueNormCache(ScoredCache):
        layer_class = ValueNormLayer

    model = tiny_model("llama-gqa")
    hf_kvplus.attach(model)
    cache = ValueNormCache(model.config, budget=8)
    model(prompt(length=20), **cache_kwargs(cache), use_cache=True)
    layer = cache.layers[0]
    assert cache.max_held == 8 and layer.pos[0, 0, -4:].tolist() == [16, 17, 18, 19]
    heavy = layer.token_state["value_norm"][..., :4]  # [1, kv_heads, 4]: the scored half
    reference = DynamicCache(config=model.config)
    model(prompt(length=20), **cache_kwargs(reference), use_cache=True)
    norms = reference.layers[0].values.norm(dim=-1)[..., :16]  # [1, kv_heads, 16] candidates
    torch.testing.assert_close(heavy.sort(dim=-1).values, norms.topk(4, dim=-1).values.sort(dim=-1).values)
