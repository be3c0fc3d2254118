"""``torch.compile`` of a decoding step (inductor on CPU, a tiny Llama): the same tokens as eager, no graph
break in our code, and no recompilation once the budget is full (slot storage: fixed shapes, device cursors or
slot entries selected by a position dynamo treats as a symbol), for recency (ring) and scored (slot) caches.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.storage.ring import RingStore
from hf_kvplus.storage.slots import SlotStore

PROMPT, STEPS, WARMUP = 40, 12, 3
# case -> (strategy, make_cache keywords): the caches whose full steady state is slot storage.
COMPILED = {
    "sink": ("sink", {"budget": 16}),  # sinks re-rotated every step (StreamingLLM's position shift)
    "window": ("window", {"budget": 16}),
    "sink-no-rerotation": ("sink", {"budget": 16, "rerotate_keys": False}),
    "h2o": ("h2o", {"budget": 16, "num_sink_tokens": 1}),  # per head, protected sinks and recent tokens
    "h2o-decay": ("h2o", {"budget": 16, "num_sink_tokens": 1, "decay": 0.9}),  # a decayed mass and count
    "tova": ("tova", {"budget": 16}),  # one ranking shared by the heads
    "keynorm": ("keynorm", {"budget": 16}),  # no attention needed
    "snapkv": ("snapkv", {"budget": 16, "window": 4}),  # sorted into position order and pooled every step
}


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _decode(model, name: str, compiled: bool) -> tuple[list[int], list[int], object]:
    """Greedy tokens of STEPS one-token steps after a prompt, and the number of compiled graphs after each step.

    Compiled as the quickstart shows (``model.forward = torch.compile(model.forward)``), so ``model(...)`` still runs
    the model hooks (padding, and the scoring attention switched on for the forwards of a scoring cache)."""
    strategy, options = COMPILED[name]
    cache = hf_kvplus.make_cache(strategy, model, **options)
    ids = torch.randint(3, 90, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    token = model(ids, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1:].argmax(-1)
    if compiled:
        model.forward = torch.compile(model.forward, backend="inductor")
    tokens, graphs = [], []
    for _ in range(STEPS):
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        token = model(input_ids=token, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        graphs.append(counters["stats"]["unique_graphs"])
    if compiled:
        del model.forward  # the class's forward again
    return tokens, graphs, cache


@pytest.mark.parametrize("name", list(COMPILED))
def test_a_compiled_decoding_step_gives_the_eager_tokens_without_recompiling(name):
    model = _model()
    eager, _, _ = _decode(model, name, compiled=False)
    torch._dynamo.reset()
    counters.clear()
    compiled, graphs, cache = _decode(model, name, compiled=True)
    assert compiled == eager
    assert all(isinstance(layer.store, (RingStore, SlotStore)) for layer in cache.layers)
    assert graphs[WARMUP:] == [graphs[WARMUP]] * (STEPS - WARMUP), f"recompiled in the steady state: {graphs}"
    assert dict(counters["graph_break"]) == {}


def test_compileable_only_inside_compilation_and_in_slot_storage():
    """Eager steps keep transformers' mask skip (no explicit mask): ``is_compileable`` is False outside compile."""
    model = _model()
    _, _, cache = _decode(model, "window", compiled=False)
    assert all(isinstance(layer.store, RingStore) for layer in cache.layers)
    assert cache.is_compileable is False
    assert hf_kvplus.make_cache("h2o", model, budget=16).is_compileable is False


def test_padding_is_read_from_a_4d_mask_at_prefill():
    """``generate`` hands a compileable cache a 4-D mask: padding is learnt from its last query row."""
    model = _model()
    cache = hf_kvplus.make_cache("sink", model, budget=8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    four_d = (causal[None] & mask[:, None, :])[:, None]  # [batch, 1, query, kv]
    cache.observe_inputs(four_d, query_length=5)
    assert cache.context.pad_len.tolist() == [2, 0]
    additive = torch.zeros(four_d.shape).masked_fill(~four_d, torch.finfo(torch.float32).min)
    other = hf_kvplus.make_cache("sink", model, budget=8)
    other.observe_inputs(additive, query_length=5)
    assert other.context.pad_len.tolist() == [2, 0]
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="left padding only"):
        hf_kvplus.make_cache("sink", model, budget=8).observe_inputs((causal[None] & right[:, None, :])[:, None], 5)
