"""A refused forward leaves every layer exactly as before, for every registered cache (issue 16, item 5).

Refusals come from a later layer than the first: models call ``update`` layer after layer, so layers before
the refusing one had already stored the new tokens (and evicted). Each case compares everything a user can
observe of every layer (``seen``, kept keys and values, positions, ``cache_nbytes``, ``get_seq_length``)
before and after the refused forward, then checks the cache still continues exactly as an untouched copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import prompt, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_kvplus
from hf_kvplus._compat import cache_kwargs

# Every registered cache but transformers' own DynamicCache (it refuses nothing: torch.cat promotes dtypes).
NAMES = [name for name in hf_kvplus.list_caches() if name != "dynamic"]
KWARGS = {"quantized": dict(nbits=8, group_size=4, residual_length=4), "snapkv": dict(window=4)}  # window < budget: it scores
BUDGET = 12


def _make(name, model):
    kwargs = dict(KWARGS.get(name, {}))
    if hf_kvplus.get_spec(name).evicting:
        kwargs["budget"] = BUDGET
    return hf_kvplus.make_cache(name, model, **kwargs)


def _observed(cache) -> list:
    state = [cache.get_seq_length(), hf_kvplus.cache_nbytes(cache)]
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        pos = layer.pos
        scores = getattr(layer, "token_state", None) or {}  # accumulated attention, key norms... in position order
        state.append((layer.seen, layer.kept, None if keys is None else keys.clone(),
                      None if values is None else values.clone(), None if pos is None else pos.clone(),
                      *(scores[name].clone() for name in sorted(scores))))
    return state


def _assert_same(before, after):
    assert before[:2] == after[:2]
    for (seen, kept, *tensors), (seen2, kept2, *tensors2) in zip(before[2:], after[2:], strict=True):
        assert (seen, kept) == (seen2, kept2)
        for a, b in zip(tensors, tensors2, strict=True):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def _refuse_at(model, layer: int):
    """From now on, layer ``layer`` hands the cache float64 keys: the cache refuses them (it holds float32)."""
    projection = model.model.layers[layer].self_attn.k_proj
    return projection.register_forward_hook(lambda module, args, output: output.to(torch.float64))


@pytest.mark.parametrize("step", ["chunk", "decode"])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_a_forward_refused_at_a_later_layer_leaves_every_layer_as_before(name, step):
    model = tiny_model("llama-gqa")
    cache = _make(name, model)
    ids = prompt(length=30, seed=5)
    model(ids[:, :20], **cache_kwargs(cache), use_cache=True)
    for column in range(20, 24):  # decoding steps: a full budget decodes in slot storage
        model(ids[:, column : column + 1], **cache_kwargs(cache), use_cache=True)
    refused_forward_rolls_back(model, cache, ids, step)


def refused_forward_rolls_back(model, cache, ids, step: str) -> None:
    """Refuse the forward of ``ids[:, 24:]`` (a chunk or one step) at layer 1; the cache must be exactly as before,
    scores and eviction bookkeeping included: the next steps evict what an untouched twin evicts."""
    twin = copy.deepcopy(cache)
    before = _observed(cache)
    handle = _refuse_at(model, layer=1)
    tokens = ids[:, 24:30] if step == "chunk" else ids[:, 24:25]
    with pytest.raises(ValueError, match=r"holds torch.float32 .* received torch.float64"):
        model(tokens, **cache_kwargs(cache), use_cache=True)
    handle.remove()
    _assert_same(before, _observed(cache))
    _decode_like_twin(model, cache, twin, ids[:, 24:30])


def _decode_like_twin(model, cache, twin, ids):
    """Decode ``ids`` one token at a time through both caches: same logits and same kept tokens at every step."""
    for column in range(ids.shape[1]):
        tokens = ids[:, column : column + 1]
        ours = model(tokens, **cache_kwargs(cache), use_cache=True).logits
        reference = model(tokens, **cache_kwargs(twin), use_cache=True).logits
        assert torch.equal(ours, reference)
        _assert_same(_observed(twin), _observed(cache))


@pytest.mark.parametrize("step", ["chunk", "decode"])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_a_failure_inside_the_model_after_some_layers_updated_is_rolled_back(name, step):
    """Not a refusal of ours: the model's own code fails after layer 1's attention ran (a scored layer has scored
    and evicted by then); the model hook ends the forward and every layer is put back."""
    model = tiny_model("llama-gqa")
    cache = _make(name, model)
    ids = prompt(length=30, seed=7)
    model(ids[:, :20], **cache_kwargs(cache), use_cache=True)
    for column in range(20, 24):
        model(ids[:, column : column + 1], **cache_kwargs(cache), use_cache=True)
    twin = copy.deepcopy(cache)
    before = _observed(cache)

    def fail(module, args, output):
        raise RuntimeError("model code failed")

    handle = model.model.layers[1].self_attn.o_proj.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="model code failed"):
        model(ids[:, 24:30] if step == "chunk" else ids[:, 24:25], **cache_kwargs(cache), use_cache=True)
    handle.remove()
    _assert_same(before, _observed(cache))
    _decode_like_twin(model, cache, twin, ids[:, 24:30])


@torch.no_grad()
def test_issue_16_values_beyond_fp16_scales_at_layer_1_leave_layer_0_empty():
    """bf16 tiny Llama, layer-1 values past fp16's range, int8 with fp16 scales: refused, nothing stored anywhere."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.model.layers[1].self_attn.v_proj.weight.mul_(1e6)  # values of order 1e5 > 65504 (fp16 max)
    cache = hf_kvplus.make_cache("int8", model, group_size=4, residual_length=4)
    with pytest.raises(ValueError, match="scale") as refusal:
        model(prompt(length=16), **cache_kwargs(cache), use_cache=True)
    assert "float16" in str(refusal.value) or "fp16" in str(refusal.value)
    assert cache.get_seq_length() == 0
    assert [layer.kept for layer in cache.layers] == [0, 0]
    assert hf_kvplus.cache_nbytes(cache) == 0
    # A model that fits the scales fills it normally afterwards.
    model.model.layers[1].self_attn.v_proj.weight.div_(1e6)
    model(prompt(length=16), **cache_kwargs(cache), use_cache=True)
    assert cache.get_seq_length() == 16 and [layer.kept for layer in cache.layers] == [16, 16]
