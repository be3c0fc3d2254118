"""Passkey retrieval scored with the exact-match metric shipped in the package (loads offline)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import hf_kvplus
from hf_kvplus.eval import load_metric, passkey_retrieval
from hf_kvplus.eval.passkey import METRICS, extract_answer


class CharTokenizer:
    """One token per character (ids 3..95), enough to build prompts for a tiny model."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 93) for c in text]}

    def decode(self, ids):
        return "".join(chr(48 + (int(i) - 3 - 48) % 93) if 3 + 48 <= int(i) < 3 + 58 else "?" for i in ids)


def test_the_shipped_metric_loads_from_its_folder_offline():
    metric = load_metric("exact_match")
    assert metric.compute(predictions=["71432", " 1 ", "x"], references=["71432", "1", "y"])["exact_match"] == pytest.approx(2 / 3)
    source = (METRICS / "exact_match" / "exact_match.py").read_text()
    assert "import datasets\nimport evaluate\n" in source  # one import per line: evaluate parses them
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; shipped: \['exact_match'\]"):
        load_metric("bleu")


def test_passkey_runs_through_any_cache_and_scores_every_sample():
    model = tiny_model("llama-gqa")
    ids = torch.randint(3, 96, (2000,), generator=torch.Generator().manual_seed(0))
    dense = passkey_retrieval(model, CharTokenizer(), ids, lambda: hf_kvplus.make_cache("dynamic", model),
                              context_length=200, depths=[0.0, 0.5], samples=2)
    sink = passkey_retrieval(model, CharTokenizer(), ids, lambda: hf_kvplus.make_cache("sink", model, budget=50),
                             context_length=200, depths=[0.0, 0.5], samples=2)
    assert len(dense["predictions"]) == len(dense["references"]) == 4
    assert all(len(r) == 5 and r.isdigit() for r in dense["references"]) and dense["references"] == sink["references"]
    assert dense["tokens_scored"] == 4 * 6  # " " + 5 digits per sample
    assert 0 <= dense["exact_match"] <= 1 and dense["ppl"] > 1
    assert sink["cache_bytes"] < dense["cache_bytes"] / 3
    with pytest.raises(ValueError, match="the text has 2000"):
        passkey_retrieval(model, CharTokenizer(), ids, lambda: None, context_length=1500, samples=2)


@pytest.mark.parametrize("text, answer", [(" 46044.\n", "46044"), (" 68239. Remember", "68239"),
                                          ("the46044", "46044"), (" a function that is", "a function that is"),
                                          (" 1.\n\nThe pass key", "1"), ("", "")])
def test_the_answer_is_the_first_number_of_the_greedy_text(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("strategy", sorted(set(hf_kvplus.list_caches()) | set(hf_kvplus.list_presets())))
def test_passkey_answers_greedily_through_every_cache(strategy):
    """The greedy answer runs through the cache itself, which a copy taken after the prompt leaves unchanged."""
    model = tiny_model("llama-gqa")
    kwargs = {"budget": 40} if hf_kvplus.get_spec(strategy).evicting else {}  # presets resolve to their strategy
    ids = torch.randint(3, 96, (1000,), generator=torch.Generator().manual_seed(1))
    result = passkey_retrieval(model, CharTokenizer(), ids, lambda: hf_kvplus.make_cache(strategy, model, **kwargs),
                               context_length=120, depths=[0.5], samples=1)
    assert len(result["answers"]) == 1 and len(result["answers"][0]) == 6 + 2  # " " + 5 digits, plus the slack
    assert result["predictions"] == [extract_answer(result["answers"][0])]
    assert result["cache_bytes_peak"] >= result["cache_bytes"] > 0


@pytest.mark.integration
def test_dense_finds_the_key_on_the_embedded_model(default_model):
    """A known answer: at 256 tokens the dense cache returns every key exactly (greedy, first number)."""
    model, tokenizer, ids = default_model
    result = passkey_retrieval(model, tokenizer, ids, lambda: hf_kvplus.make_cache("dynamic", model),
                               context_length=256, depths=[0.1, 0.9], samples=1)
    assert result["predictions"] == result["references"] and result["exact_match"] == 1.0
    assert all(answer.startswith(" " + key) for answer, key in zip(result["answers"], result["references"], strict=True))
