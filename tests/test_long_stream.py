"""Long streams through the sink cache: memory flat, perplexity stable, positions far past training.

The full run (100k tokens on the embedded model) is ``benchmarks/long_stream.py``; these are its short
versions: a unit test on a one-layer model streaming ten times past ``max_position_embeddings``, and an
integration test streaming 4k tokens of the default text past a small budget.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, prompt
from transformers import LlamaConfig, LlamaForCausalLM

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.eval import streaming_perplexity
from hf_kvplus.memory import current_rss_bytes

MAX_POSITIONS, TOTAL, SINKS, WINDOW = 48, 480, 4, 12


@pytest.mark.parametrize("rerotate", [True, False])
@torch.no_grad()
def test_streaming_ten_times_past_the_trained_positions(rerotate):
    """One layer: the cached state is a fresh forward over the kept tokens. Re-rotated, those sit at the
    contiguous positions ``0 .. budget`` (inside the trained range) whatever the stream's length; not
    re-rotated, the sinks sit ``TOTAL`` positions away from the query, ten times the trained range."""
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)
    model = LlamaForCausalLM(config).eval()
    ids = prompt(length=TOTAL, seed=11)
    cache = hf_kvplus.make_cache("sink", model, budget=SINKS + WINDOW, num_sink_tokens=SINKS, rerotate_keys=rerotate)
    result = streaming_perplexity(model, cache, ids[0, :-1], report_every=MAX_POSITIONS)
    assert cache.get_seq_length() == TOTAL - 2 and cache.max_held == SINKS + WINDOW
    held = result["window_cache_bytes"]
    assert len(held) == 10 and len(set(held)) == 1  # flat from the first window on
    assert all(0 < ppl < float("inf") for ppl in result["window_ppl"])

    kept = list(range(SINKS)) + list(range(TOTAL - 2 - WINDOW, TOTAL - 2))
    assert cache.layers[0].pos.tolist() == kept
    got = model(ids[:, -2:-1], **cache_kwargs(cache), use_cache=True).logits[0, -1]
    tokens = ids[:, kept + [TOTAL - 2]]
    inside = model(tokens, position_ids=torch.arange(len(kept) + 1)[None]).logits[0, -1]
    if rerotate:  # exactly the model on a short sequence, within its trained positions
        torch.testing.assert_close(got, inside, atol=2e-5, rtol=1e-4)
    else:
        original = model(tokens, position_ids=torch.tensor([kept + [TOTAL - 2]])).logits[0, -1]
        torch.testing.assert_close(got, original, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(got, inside, atol=1e-3)  # the sinks are far outside the trained range


@pytest.mark.integration
def test_the_embedded_model_streams_at_flat_memory_and_stable_perplexity(default_model):
    """4k tokens past a 256-token budget (the CI version of benchmarks/long_stream.py)."""
    model, _, ids = default_model
    budget, tokens, every = 256, 4096, 512
    cache = hf_kvplus.make_cache("sink", model, budget=budget)
    rss_before = current_rss_bytes()
    result = streaming_perplexity(model, cache, ids, num_tokens=tokens, chunk_size=32, report_every=every)
    assert cache.max_held <= budget + 32 and all(layer.kept == budget for layer in cache.layers)
    held = result["window_cache_bytes"]
    assert len(held) == tokens // every and len(set(held)) == 1  # flat: the budget is reached in the first window
    # 46,080 bytes per token in fp32: budget + 1 slots, and the sinks' first keys (float32, with their rotate_half)
    assert held[0] == hf_kvplus.make_cache("sink", model.config, budget=budget).predict_nbytes(tokens, dtype=torch.float32)
    assert held[0] < (budget + 1 + 4) * 46_080 * 1.01
    rss = result["window_rss_bytes"]
    assert max(rss) - min(rss) < 64 * 2**20 and max(rss) - rss_before < 128 * 2**20
    ppl = sorted(result["window_ppl"])
    assert ppl[-1] < 2 * ppl[len(ppl) // 2] and ppl[-1] < 30  # no window collapses (a window without sinks does)
