"""SinkCache: the kept set, exact re-rotation, argument validation, cropping."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, prompt, tiny_model
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_kvplus
from hf_kvplus import SinkCache
from hf_kvplus._compat import cache_kwargs


def one_layer(arch: str):
    """One decoder layer: its cached keys depend only on each token and its position."""
    torch.manual_seed(1)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096,
        )
        return LlamaForCausalLM(config).eval()
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=4096, rotary_pct=0.5,
    )
    return GPTNeoXForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
@pytest.mark.parametrize("rerotate", [True, False])
@torch.no_grad()
def test_sink_cache_equals_attention_over_the_kept_tokens(arch, rerotate):
    """With one layer, the cached state is exactly a fresh forward over the kept tokens.

    Re-rotated: the kept tokens sit at contiguous positions. Not re-rotated: at their original ones.
    """
    model = one_layer(arch)
    sinks, window, total = 3, 9, 40
    ids = prompt(length=total, seed=7)
    cache = hf_kvplus.make_cache("sink", model, budget=sinks + window, num_sink_tokens=sinks, rerotate_keys=rerotate)
    for t in range(total - 1):
        model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
    kept = list(range(sinks)) + list(range(total - 1 - window, total - 1))
    assert cache.layers[0].pos.tolist() == kept
    got = model(ids[:, -1:], **cache_kwargs(cache), use_cache=True).logits[0, -1]

    tokens = ids[:, kept + [total - 1]]
    if rerotate:  # contiguous positions ending at the present
        positions = torch.arange(total - 1 - len(kept), total)[None]
    else:
        positions = torch.tensor([kept + [total - 1]])
    expected = model(tokens, position_ids=positions).logits[0, -1]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_sliding_window_preset_keeps_only_recent_tokens():
    model = one_layer("llama")
    cache = hf_kvplus.make_cache("window", model, budget=8)
    assert cache.num_sink_tokens == 0 and not cache.rerotate_keys
    model(prompt(length=30), **cache_kwargs(cache), use_cache=True)
    assert cache.layers[0].pos.tolist() == list(range(22, 30))
    assert cache.get_seq_length() == 30


@torch.no_grad()
def test_window_length_and_budget_are_equivalent():
    config = one_layer("llama").config
    assert SinkCache(config, window_length=60, num_sink_tokens=4).budget == 64
    assert SinkCache(config, budget=64).window_length == 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(budget=4, num_sink_tokens=4), "larger than num_sink_tokens"),
        (dict(budget=16, window_length=12), "exactly one of budget or window_length"),
        (dict(), "exactly one of budget or window_length"),
        (dict(budget=-3), "budget must be an integer >= 1"),
        (dict(budget=2.5), "budget must be an integer >= 1"),
        (dict(window_length=0), "window_length must be an integer >= 1"),
        (dict(budget=16, num_sink_tokens=-1), "num_sink_tokens must be an integer >= 0"),
        (dict(budget=16, rerotate_keys="yes"), "rerotate_keys must be True or False"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinkCache(one_layer("llama").config, **kwargs)


def test_rerotation_needs_rope_parameters():
    config = one_layer("llama").config
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rerotate_keys=False"):
        SinkCache(config, budget=16)
    assert SinkCache(config, budget=16, rerotate_keys=False).budget == 16


@torch.no_grad()
def test_crop_rolls_back_recent_tokens_and_refuses_evicted_ones():
    model = one_layer("llama")
    cache = hf_kvplus.make_cache("sink", model, budget=10, num_sink_tokens=2)
    model(prompt(length=30), **cache_kwargs(cache), use_cache=True)
    cache.crop(-3)
    assert cache.get_seq_length() == 27
    assert cache.layers[0].pos.tolist() == [0, 1] + list(range(22, 27))
    with pytest.raises(ValueError, match="already evicted"):
        cache.crop(-6)
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(5)


@pytest.mark.parametrize("budget", [None, 14])
@torch.no_grad()
def test_assisted_decoding_defers_eviction_until_commit(budget):
    model = hf_kvplus.attach(one_layer("llama"), attention_scores=True)  # drafts are verified in "kvplus" attention
    ids = prompt(length=24, seed=2).repeat(1, 2)  # repeated text gives prompt lookup something to find
    kwargs = {"budget": budget} if budget else {"budget": 10_000}
    plain = model.generate(ids, max_new_tokens=20, do_sample=False, **cache_kwargs(hf_kvplus.make_cache("sink", model, **kwargs)))
    cache = hf_kvplus.make_cache("sink", model, **kwargs)
    assisted = model.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4, **cache_kwargs(cache))
    assert cache.layers[0].record_past
    assert cache.get_seq_length() == assisted.shape[1] - 1
    assert torch.equal(assisted, plain)  # with eviction too: drafts see what plain decoding kept at their step
    if budget is not None:
        assert max(layer.kept for layer in cache.layers) <= budget


def test_evicting_a_batch_without_padding_information_is_refused():
    model = one_layer("llama")
    cache = SinkCache(model.config, budget=8)  # built from the config: no hook sees the padding
    with pytest.raises(ValueError, match="without knowing their padding"):
        model(prompt(batch=2, length=12), **cache_kwargs(cache), use_cache=True)
    hf_kvplus.attach(model)
    cache = SinkCache(model.config, budget=8)
    model(prompt(batch=2, length=12), **cache_kwargs(cache), use_cache=True)
    assert cache.max_held == 8


@torch.no_grad()
def test_right_padding_is_refused_once_tokens_are_evicted():
    model = one_layer("llama")
    ids = prompt(batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        model(ids, attention_mask=mask, **cache_kwargs(hf_kvplus.make_cache("sink", model, budget=8)), use_cache=True)


@pytest.mark.parametrize("name", ["sink", "window"])
def test_slot_storage_under_no_grad_and_a_backward_through_the_cache_with_grad(name):
    """Decoding (no grad) runs in slot storage; with autograd recording, layers keep the dense layout so a
    backward through several cached steps works (in-place slot writes would break it)."""
    from hf_kvplus.storage.ring import RingStore

    model = tiny_model()
    with torch.no_grad():
        cache = hf_kvplus.make_cache(name, model, budget=8)
        model(prompt(length=20), **cache_kwargs(cache, model), use_cache=True)
        model(prompt(length=1, seed=1), **cache_kwargs(cache, model), use_cache=True)
        assert all(isinstance(layer.store, RingStore) for layer in cache.layers)
    cache = hf_kvplus.make_cache(name, model, budget=8)
    loss = model(prompt(length=20), **cache_kwargs(cache, model), use_cache=True).logits.sum()
    for step in range(3):
        loss = loss + model(prompt(length=1, seed=step), **cache_kwargs(cache, model), use_cache=True).logits.sum()
    loss.backward()
    assert all(not isinstance(layer.store, RingStore) for layer in cache.layers) and cache.max_held == 8
