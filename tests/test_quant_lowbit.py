"""Low-bit options of packed storage (issue 17): separate key/value bits, Hadamard-rotated keys, exact sinks, keys
quantized before RoPE. Exactness where the math is exact, refusals, exact bits per element, decoding step == eager."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import hf_kvplus
from hf_kvplus.quant.rotation import check_rotation, hadamard
from hf_kvplus.rope import shift_keys
from hf_kvplus.storage.factory import quantized_store_factory
from hf_kvplus.storage.packed import QuantizedStore

D = 64
ROPE = (1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), 1.0, "half")
# Option sets run through the same store checks: keyword arguments of quantized_store_factory.
OPTIONS = {
    "k8v4": dict(nbits=4, key_bits=8, value_bits=4),
    "k4v2": dict(nbits=2, key_bits=4, value_bits=2),
    "int8-rotated": dict(nbits=8, rotation="hadamard"),
    "int4-rotated": dict(nbits=4, rotation="hadamard"),
    "int8-sinks": dict(nbits=8, sinks=3),
    "int8-pre-rope": dict(nbits=8, rope=ROPE),
    "int2r": dict(nbits=2, rotation="hadamard", sinks=4),
    "int2rp": dict(nbits=2, rotation="hadamard", sinks=4, rope=ROPE),
    "k4v2-rotated-pre-rope": dict(nbits=2, key_bits=4, value_bits=2, rotation="hadamard", sinks=2, rope=ROPE),
}


def _kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, tokens, D, generator=g)  # [b, h, t, d]
    keys[..., 3] *= 20  # an outlier channel, as real keys have
    return keys, torch.randn(1, 2, tokens, D, generator=g)


def test_hadamard_is_orthonormal_and_symmetric():
    h = hadamard(D)
    torch.testing.assert_close(h @ h.T, torch.eye(D), atol=1e-6, rtol=0)
    assert torch.equal(h, h.T)
    assert torch.allclose(h.abs(), torch.full_like(h, D**-0.5))


@pytest.mark.parametrize("name", list(OPTIONS))
@torch.no_grad()
def test_decoding_step_returns_what_the_eager_path_restores(name):
    """The hot path (scratch, a few ops) returns the eager reconstruction of the same state, token for token."""
    store = quantized_store_factory(group_size=8, residual_length=8, scratch=True, dequant="eager", **OPTIONS[name])()
    keys, values = _kv(45)
    store.update(keys, values)
    steps = 0
    for i in range(24):
        k, v = _kv(1, seed=100 + i)
        before_k, before_v = store.get()
        expected_k, expected_v = torch.cat([before_k, k], 2), torch.cat([before_v, v], 2)
        assert store._fast_ready(k)
        got_k, got_v = store.update(k, v)
        steps += 1
        torch.testing.assert_close(got_k, expected_k, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got_v, expected_v, atol=2e-5, rtol=1e-5)
    assert store.quantized_length > 0 and steps == 24


@torch.no_grad()
def test_rotated_keys_give_the_scores_of_unrotated_ones_at_8_bits():
    """q . k with rotated-then-restored keys equals q . k with the original keys, up to the int8 error."""
    keys, values = _kv(64 + 16)
    query = torch.randn(1, 2, 1, D)
    exact = query @ keys.transpose(-1, -2)  # [b, h, 1, t]
    for rotation in (None, "hadamard"):
        store = QuantizedStore(nbits=8, group_size=16, residual_length=16, rotation=rotation)
        store.append(keys, values)
        restored = store.get()[0]
        assert store.quantized_length == 64
        torch.testing.assert_close(query @ restored.transpose(-1, -2), exact, atol=0.5, rtol=0.01)
    rotated = QuantizedStore(nbits=8, group_size=16, residual_length=16, rotation="hadamard")
    rotated.append(keys, values)
    # The codes are those of keys @ H: restoring without the inverse rotation gives the rotated keys.
    from hf_kvplus.quant import dequantize_keys

    raw = dequantize_keys(rotated.key_codes, rotated.key_scale, rotated.key_zero, 8, 16)
    torch.testing.assert_close(raw, keys[:, :, :64] @ hadamard(D), atol=0.2, rtol=0)


@torch.no_grad()
def test_keys_before_rope_round_trip_and_are_quantized_at_position_zero():
    keys, values = _kv(48)
    store = QuantizedStore(nbits=8, group_size=16, residual_length=0, rope=ROPE, sinks=2)
    store.append(keys, values)
    assert store.quantized_length == 32 and store.residual == 14 and store._s == 2
    torch.testing.assert_close(store.get()[0], keys, atol=0.35, rtol=0)  # int8 of a channel 20x wider than the rest
    from hf_kvplus.quant import dequantize_keys

    raw = dequantize_keys(store.key_codes, store.key_scale, store.key_zero, 8, 16)  # [1, 2, 32, d]
    at_zero = shift_keys(keys[:, :, 2:34], -torch.arange(2, 34), ROPE[0])
    torch.testing.assert_close(raw, at_zero, atol=0.35, rtol=0)


@torch.no_grad()
def test_sinks_are_held_exactly():
    keys, values = _kv(100)
    store = quantized_store_factory(nbits=2, group_size=8, residual_length=8, scratch=True, sinks=4,
                                    rotation="hadamard")()
    store.update(keys[:, :, :60], values[:, :, :60])
    for t in range(60, 100):
        out_k, out_v = store.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        assert torch.equal(out_k[:, :, :4], keys[:, :, :4]) and torch.equal(out_v[:, :, :4], values[:, :, :4])
    assert store.quantized_length > 64 and not torch.equal(store.get()[0][:, :, 4:8], keys[:, :, 4:8])


def test_bits_per_element_are_counted_exactly():
    """History: (key_bits + value_bits) / 2 for codes, plus a float16 scale and zero per key group of tokens and per
    value group of channels. Everything: the same over the held buffers, residual buffer and sinks included."""
    store = QuantizedStore(nbits=2, key_bits=4, value_bits=2, group_size=16, residual_length=16, sinks=4)
    keys, values = _kv(4 + 64 + 16)
    store.append(keys, values)  # 4 sinks, 64 quantized, 16 residual (in a 32-slot buffer)
    assert (store._s, store.quantized_length, store.residual) == (4, 64, 16)
    assert store.history_bits_per_element() == (4 + 2) / 2 + 16 / 16 + 16 / 16  # 5.0: 32 bits per group of 16
    held_bytes = 64 * D * (4 + 2) // 8 + 2 * (64 // 16) * D * 2 + 2 * 64 * (D // 16) * 2 + 2 * 32 * D * 4 + 2 * 4 * D * 4
    assert store.bits_per_element() == 8 * held_bytes * 2 / (2 * 2 * 84 * D)
    int2 = QuantizedStore(nbits=2, group_size=64, residual_length=0)
    int2.append(*_kv(128))
    assert int2.history_bits_per_element() == 2.5  # KIVI int2 with groups of 64: 2 + 16/64 + 16/64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(key_bits=3), "key_bits must be one of .8, 4, 2., got 3 .3-bit codes"),
        (dict(value_bits=1), "value_bits must be one of"),
        (dict(rotation="random"), "rotation must be one of"),
        (dict(sinks=-1), "sinks"),
        (dict(rotation="hadamard", backend="quanto"), "backend='torch' only"),
    ],
)
def test_bad_store_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantized_store_factory(**{"nbits": 2, **kwargs})


def test_hadamard_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="head_dim=48"):
        check_rotation("hadamard", 48)
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # head_dim 48
    with pytest.raises(ValueError, match="power of two"):
        hf_kvplus.make_cache("int2r", config)
    with pytest.raises(ValueError, match="power of two"):
        hf_kvplus.make_cache("sink", config, budget=32, nbits=2, rotation="hadamard")


def test_sinks_and_pre_rope_are_refused_where_tokens_move():
    model = tiny_model("llama-gqa")
    for name, value in (("sinks", 4), ("pre_rope", True)):
        with pytest.raises(ValueError, match=f"{name}=.*caches that keep every token"):
            hf_kvplus.make_cache("h2o", model, budget=32, nbits=2, **{name: value})
    with pytest.raises(ValueError, match="pre_rope must be True or False"):
        hf_kvplus.make_cache("quantized", model, pre_rope="yes")


def test_nbits_still_sets_both_and_presets_resolve():
    store = QuantizedStore(nbits=2)
    assert (store.key_bits, store.value_bits, store.mixed) == (2, 2, False)
    model = tiny_model("llama-gqa")
    layer = hf_kvplus.make_cache("k4v2", model).layers[0]
    assert (layer.store_factory().key_bits, layer.store_factory().value_bits) == (4, 2)
    store = hf_kvplus.make_cache("int2r", model).layers[0].store_factory()
    assert (store.nbits, store.rotation, store.sinks, store.rope) == (2, "hadamard", 4, None)
    assert hf_kvplus.make_cache("int2rp", model).layers[0].store_factory().rope is not None


@torch.no_grad()
def test_evicting_strategies_take_mixed_bits_and_rotated_keys():
    """key_bits/value_bits and rotation are storage keywords of every strategy (eviction gathers rotated rows)."""
    from hf_kvplus._compat import cache_kwargs

    model = tiny_model("llama-gqa")
    ids = torch.randint(3, 90, (1, 30), generator=torch.Generator().manual_seed(1))
    cache = hf_kvplus.make_cache("h2o", model, budget=16, key_bits=8, value_bits=4, rotation="hadamard",
                                 group_size=4, residual_length=4)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, **cache_kwargs(cache))
    assert out.shape[1] == 42 and max(layer.kept for layer in cache.layers) <= 16
    store = cache.layers[0].store
    assert (store.key_bits, store.value_bits, store.rotation) == (8, 4, "hadamard") and store.quantized_length > 0
    keys = store.get()[0]  # rotated back: the model's basis, close to an unrotated int8 store's keys
    plain = hf_kvplus.make_cache("h2o", model, budget=16, nbits=8, group_size=4, residual_length=4)
    model.generate(ids, max_new_tokens=12, do_sample=False, **cache_kwargs(plain))
    assert keys.shape == plain.layers[0].store.get()[0].shape
