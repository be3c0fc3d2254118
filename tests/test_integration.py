"""Integration tests on the embedded SmolLM2-135M model (select with ``-m integration``)."""

from __future__ import annotations

import pytest
import torch

import hf_kvplus
from hf_kvplus.eval import compression_perplexity, streaming_perplexity
from hf_kvplus.memory import kv_bytes_per_token

pytestmark = pytest.mark.integration


def test_default_model_is_smollm2_135m(default_model):
    model, tokenizer, ids = default_model
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64 and config.max_position_embeddings == 8192
    assert kv_bytes_per_token(30, 3, 64, 4) == 46_080
    assert 100_000 < ids.numel() < 130_000
    assert tokenizer.decode(ids[:8]).strip()


def cache_for_prediction(model, budget):
    return hf_kvplus.make_cache("sink", model.config, budget=budget)


def test_sink_streams_at_flat_memory_and_beats_a_sliding_window(default_model):
    model, _, ids = default_model
    budget, tokens = 128, 768
    results = {}
    for name in ("sink", "window"):
        cache = hf_kvplus.make_cache(name, model, budget=budget)
        results[name] = streaming_perplexity(model, cache, ids, num_tokens=tokens, report_every=128)
        assert cache.max_held == budget
        assert cache.get_seq_length() == tokens - 1
    sink = results["sink"]
    held = sink["window_cache_bytes"]
    assert len(held) == 6 and len(set(held[1:])) == 1  # flat once the budget is reached
    assert held[-1] >= budget * 46_080  # the KV itself
    # Slot storage: budget + 1 slots, and the 4 sinks' first keys (float32, with their rotate_half).
    assert held[-1] == cache_for_prediction(model, budget).predict_nbytes(tokens - 1, dtype=torch.float32)
    assert held[-1] < (budget + 1 + 4) * 46_080 * 1.01
    assert sink["ppl"] < 0.8 * results["window"]["ppl"]


@torch.no_grad()
def test_dense_compression_baseline(default_model):
    model, _, ids = default_model
    result = compression_perplexity(model, lambda: hf_kvplus.make_cache("dynamic", model), ids, windows=1)
    assert result["cache_bytes"] == 2048 * 46_080
    assert 8.5 < result["ppl"] < 9.5
