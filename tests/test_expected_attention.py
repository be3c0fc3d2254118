"""Expected attention (``make_cache("expected", ...)``): statistics of the queries and the scores built from them.

The statistics must be those of the queries before RoPE (captured here from ``q_proj``), and the score
of a key must be what the mean query, rotated by the model's own RoPE to each of the next ``future``
positions, gives it on average (the averaged rotation applied to the mean is the same linear map).
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model

import hf_kvplus
from hf_kvplus._compat import cache_kwargs


def _pre_rope_queries(model, ids):
    """Queries before RoPE of every layer, ``[batch, q_heads, n, head_dim]``, from the ``q_proj`` outputs."""
    captured, handles = {}, []
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(model.model.layers):
        def hook(module, args, output, index=index):
            batch, n, _ = output.shape
            captured[index] = output.view(batch, n, -1, head_dim).transpose(1, 2).float()
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def test_statistics_are_those_of_the_queries_before_rope_sinks_left_out():
    model = tiny_model("llama-gqa")
    ids = prompt(length=30, seed=1)
    sinks = 3
    cache = hf_kvplus.make_cache("expected", model, budget=40, num_sink_tokens=sinks)  # no eviction yet
    model(ids[:, :20], **cache_kwargs(cache, model), use_cache=True)  # two forwards: the sums carry over
    model(ids[:, 20:], **cache_kwargs(cache, model), use_cache=True)
    queries = _pre_rope_queries(model, ids)
    for index, layer in enumerate(cache.layers):
        total, first, second = layer._qstats
        q = queries[index][:, :, sinks:]  # [batch, q_heads, n - sinks, d]
        assert torch.equal(total.flatten(), torch.tensor([30.0 - sinks]))
        torch.testing.assert_close(first / total, q.mean(dim=2), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(second / total, q.transpose(2, 3) @ q / q.shape[2], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_the_mean_term_is_the_mean_query_rotated_by_the_model_to_each_future_position():
    model = tiny_model("llama-gqa")
    ids = prompt(length=26, seed=2)
    future = 16
    cache = hf_kvplus.make_cache("expected", model, budget=40, future=future, covariance=False, value_norm=False)
    model(ids, **cache_kwargs(cache, model), use_cache=True)
    rotary = model.model.rotary_emb
    for layer in cache.layers:
        total, first, _ = layer._qstats
        mean = first / total  # [batch, q_heads, d], before RoPE
        keys = layer.keys.float()  # [batch, kv_heads, kept, d], after RoPE
        positions = torch.arange(layer.seen, layer.seen + future)[None]
        cos, sin = rotary(mean, positions)  # [1, future, d]
        half = mean.shape[-1] // 2
        rotated_half = torch.cat((-mean[..., half:], mean[..., :half]), dim=-1)
        at = mean[:, :, None] * cos[:, None] + rotated_half[:, :, None] * sin[:, None]  # [b, q_heads, future, d]
        groups = mean.shape[1] // keys.shape[1]
        logits = at @ keys.repeat_interleave(groups, dim=1).transpose(2, 3)  # [b, q_heads, future, kept]
        logits = logits.mean(dim=2) * layer._scaling
        expected = torch.softmax(logits, dim=-1).view(keys.shape[0], keys.shape[1], groups, -1).mean(dim=2)
        torch.testing.assert_close(layer.score(), expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_it_evicts_to_its_budget_at_prefill_and_while_decoding_and_keeps_the_sinks():
    model = tiny_model("llama-gqa")
    ids = prompt(length=40, seed=3)
    cache = hf_kvplus.make_cache("expected", model, budget=12)
    out = model(ids[:, :30], **cache_kwargs(cache, model), use_cache=True)
    for _ in range(5):
        out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache, model), use_cache=True)
    for layer in cache.layers:
        assert layer.kept == 12 and layer.seen == 35
        assert torch.equal(layer.pos[..., :4], torch.arange(4).expand_as(layer.pos[..., :4]))  # 4 sinks by default
    assert cache.max_held == 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"future": 0}, "future"),
        ({"query_decay": 0}, "query_decay must be a number in \\(0, 1\\]"),
        ({"query_decay": 1.5}, "got 1.5"),
        ({"query_decay": True}, "query_decay"),
        ({"covariance": "yes"}, "covariance must be True or False, got 'yes'"),
        ({"value_norm": 1}, "value_norm must be True or False"),
        ({"observed": 1.5}, "observed must be a number in \\[0, 1\\].*got 1.5"),
    ],
)
def test_bad_options_are_refused_naming_the_value(kwargs, message):
    model = tiny_model("llama-gqa")
    with pytest.raises(ValueError, match=message):
        hf_kvplus.make_cache("expected", model, budget=12, **kwargs)
