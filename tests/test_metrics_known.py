"""Every metric a recipe reports, on a case whose answer is known before running.

A model whose output head is zero predicts the uniform distribution over its vocabulary, so every protocol's
perplexity is exactly the vocabulary size; a dense cache holds a known number of bytes; ratios to dense follow
from a hand-made table; and the exact-match score of known predictions is known.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_passkey import CharTokenizer

import hf_kvplus
from hf_kvplus.eval import PROTOCOLS, load_metric
from hf_kvplus.eval.results import add_dense_ratios

OPTIONS = {
    "compression": {"context_length": 20, "target_length": 10, "windows": 2, "prefill_chunk_size": None,
                    "decode_tokens": 2},
    "streaming": {"num_tokens": 40, "chunk_size": 1, "report_every": 20},
    "passkey": {"context_length": 120, "depths": [0.5], "samples": 1, "seed": 0},
}
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # keys and values x 2 layers x 2 KV heads x head_dim 16 x fp32


def uniform_model():
    model = tiny_model("llama-gqa")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 everywhere: p = 1 / VOCAB for every token
    return model


@pytest.mark.parametrize("protocol", sorted(OPTIONS))
def test_a_uniform_model_scores_the_vocabulary_size(protocol):
    model = uniform_model()
    ids = torch.randint(3, VOCAB, (1000,), generator=torch.Generator().manual_seed(0))
    result = PROTOCOLS[protocol].run(model, CharTokenizer(), ids, lambda: hf_kvplus.make_cache("dynamic", model),
                                     PROTOCOLS[protocol].parse_options(OPTIONS[protocol], protocol))
    assert result["ppl"] == pytest.approx(VOCAB, rel=1e-5)
    held = {"compression": 20, "streaming": 40 - 1, "passkey": 120}[protocol]  # tokens in the cache when measured
    assert result["cache_bytes"] == held * BYTES_PER_TOKEN


def test_ratios_to_dense_follow_from_the_table():
    rows = add_dense_ratios([
        {"experiment": "c", "strategy": "dynamic", "status": "ok", "ppl": 10.0, "cache_mib": 40.0},
        {"experiment": "c", "strategy": "sink", "status": "ok", "ppl": 12.5, "cache_mib": 10.0},
        {"experiment": "c", "strategy": "h2o", "status": "error", "ppl": None, "cache_mib": None},
        {"experiment": "d", "strategy": "sink", "status": "ok", "ppl": 3.0, "cache_mib": 1.0},  # no dense in d
    ])
    assert [(r["ppl_vs_dense"], r["memory_saved"]) for r in rows] == [(1.0, 0.0), (1.25, 0.75), (None, None),
                                                                      (None, None)]


def test_exact_match_of_known_predictions():
    metric = load_metric("exact_match")
    assert metric.compute(predictions=["46044", "68239", "1"], references=["46044", "68239", "24933"]) == {
        "exact_match": pytest.approx(2 / 3)}
    assert metric.compute(predictions=[], references=[]) == {"exact_match": 0.0}
