"""Shared fixtures: tiny random-init models built from configs (no download), and the embedded model."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may download (set before huggingface_hub loads)

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 96


def _llama_gqa():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def _gpt_neox():
    # Multi-head attention with partial rotary embeddings (a quarter of each head rotates).
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, rotary_pct=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return GPTNeoXForCausalLM(config)


def _qwen2():
    # Biased q/k/v projections and multi-query attention (one KV head).
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return Qwen2ForCausalLM(config)


ARCHITECTURES = {"llama-gqa": _llama_gqa, "gpt-neox": _gpt_neox, "qwen2-mqa": _qwen2}


@functools.lru_cache(maxsize=None)
def _build(arch: str):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    model.generation_config.pad_token_id = 0
    # A random model emits its EOS or pad id by chance; tests that count steps or continue from returned
    # sequences (whose mask generate infers from the pad id) need every step to be a real token.
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = [0]
    return model


def tiny_model(arch: str = "llama-gqa"):
    """A fresh copy of a tiny random model (copied so hooks and attention settings never leak between tests)."""
    import copy

    return copy.deepcopy(_build(arch))


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


def prompt(batch: int = 1, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@functools.lru_cache(maxsize=1)
def _default_model_and_tokens():
    from hf_kvplus.eval import load_default_model, load_default_text, load_default_tokenizer

    model = load_default_model()
    tokenizer = load_default_tokenizer()
    ids = tokenizer(load_default_text(), return_tensors="pt").input_ids[0]
    return model, tokenizer, ids


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer, token ids of the default text), loaded once per session."""
    return _default_model_and_tokens()



def save_tiny(folder, arch: str = "llama-gqa"):
    """Save a tiny random model plus a character-level tokenizer to ``folder`` (loadable by path, offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model(arch).save_pretrained(folder)
    vocab = {"[UNK]": 0, **{chr(i): i - 30 for i in range(32, 122)}}  # ids 2..91 < VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)
