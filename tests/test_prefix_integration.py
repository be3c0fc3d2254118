"""The prefix store on the embedded SmolLM2-135M model: the chat example reuses every previous turn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import hf_kvplus

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chat_prefix_cache.py"


def load_example():
    spec = importlib.util.spec_from_file_location("chat_prefix_cache", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def test_chat_turns_reuse_the_previous_turns_and_answer_as_without_the_store(default_model):
    model, tokenizer, _ = default_model
    example = load_example()
    store = hf_kvplus.PrefixStore(max_bytes=64 * 2**20)
    first, second = example.chat(model, tokenizer, store, questions=example.QUESTIONS[:2], max_new_tokens=12)
    assert first["reused"] == 0
    assert second["reused"] >= first["prompt_tokens"]  # the whole first prompt, plus the answer's whole blocks
    assert second["prefilled"] < second["prompt_tokens"] - first["prompt_tokens"]
    messages = [{"role": "system", "content": example.SYSTEM}, {"role": "user", "content": example.QUESTIONS[0]},
                {"role": "assistant", "content": first["answer"]}, {"role": "user", "content": example.QUESTIONS[1]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    plain = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True).strip() == second["answer"]
    assert store.nbytes == hf_kvplus.cache_nbytes(store) <= store.max_bytes
