"""Quantization kernels: bit packing, min/max round trips, layouts and argument checks."""

from __future__ import annotations

import pytest
import torch

from hf_kvplus.quant import (
    dequantize_keys,
    dequantize_values,
    minmax_quantize,
    pack,
    unpack,
    quantize_keys,
    quantize_values,
)


def _data(kind: str, shape=(2, 3, 64, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if kind == "outlier-channel":
        x[..., 5] *= 40.0
    elif kind == "offset":  # large common offset, small spread: a rounded zero point must not eat the range
        x = 1000.0 + 0.01 * x
    elif kind == "constant":
        x = torch.full(shape, 0.75)
    elif kind == "tiny":
        x = 1e-6 * x
    return x


@pytest.mark.parametrize(
    ("nbits", "packed_bytes"), [(8, 32), (4, 16), (2, 8)], ids=["int8", "int4", "int2"]
)
def test_pack_unpack_is_exact_and_compact(nbits, packed_bytes):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2**nbits, (3, 5, 32), generator=g, dtype=torch.uint8)
    packed = pack(codes, nbits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, packed_bytes)
    assert torch.equal(unpack(packed, nbits), codes)
    assert torch.equal(unpack(packed[1:2, 3:], nbits), codes[1:2, 3:])  # any token subset unpacks alone


@pytest.mark.parametrize(
    ("codes", "nbits", "byte"),
    [([1, 2, 3, 0], 2, 1 | 2 << 2 | 3 << 4), ([3, 3, 3, 3], 2, 255), ([10, 5], 4, 10 | 5 << 4), ([200], 8, 200)],
)
def test_pack_bit_layout(codes, nbits, byte):
    assert pack(torch.tensor([codes], dtype=torch.uint8), nbits).tolist() == [[byte]]


@pytest.mark.parametrize("kind", ["normal", "outlier-channel", "offset", "constant", "tiny"])
@pytest.mark.parametrize(("nbits", "rms_steps"), [(8, 0.3), (4, 0.3), (2, 0.35)])
def test_minmax_round_trip_error_is_within_half_a_step(kind, nbits, rms_steps):
    x = _data(kind)
    codes, scale, zero = minmax_quantize(x, nbits, dim=-1)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**nbits
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == (*x.shape[:-1], 1)
    restored = zero.float() + codes * scale.float()
    error = (restored - x).abs()
    step = scale.float()
    assert bool((error <= step / 2 * (1 + 1e-4) + 1e-7 * x.abs().amax(-1, keepdim=True)).all())
    # The stored range hardly exceeds the data's: the step is (max - min) / (2**nbits - 1) up to float16
    # rounding of the zero point and the scale (relative 2**-10, or one subnormal spacing 2**-24).
    ideal = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**nbits - 1)
    slack = 2**-10 * x.abs().amax(-1, keepdim=True) / (2**nbits - 1) + 2**-23
    assert bool((step <= ideal * 1.002 + slack).all())
    if kind == "normal":  # uniform rounding error: rms about 0.29 of a step
        assert float((error / step).pow(2).mean().sqrt()) < rms_steps


def test_constant_groups_are_exact():
    x = _data("constant")
    codes, scale, zero = minmax_quantize(x, 2, dim=-1)
    assert torch.equal(zero.float() + codes * scale.float(), x)


@pytest.mark.parametrize(("nbits", "max_relative"), [(8, 0.01), (4, 0.15), (2, 0.7)])
def test_keys_per_channel_and_values_per_token(nbits, max_relative):
    keys, values = _data("outlier-channel"), _data("normal")
    packed, scale, zero = quantize_keys(keys, nbits, group_size=16)
    assert packed.shape == (2, 3, 64, 32 * nbits // 8) and scale.shape == zero.shape == (2, 3, 4, 32)
    restored = dequantize_keys(packed, scale, zero, nbits, group_size=16)
    # Per channel: the outlier channel does not spoil the others.
    normal_channels = [c for c in range(32) if c != 5]
    error = (restored - keys)[..., normal_channels].abs().max()
    assert float(error) < max_relative * float(keys[..., normal_channels].abs().max())
    packed, scale, zero = quantize_values(values, nbits, group_size=8)
    assert packed.shape == (2, 3, 64, 32 * nbits // 8) and scale.shape == (2, 3, 64, 4)
    restored = dequantize_values(packed, scale, zero, nbits, dtype=torch.bfloat16)
    assert restored.dtype == torch.bfloat16
    assert float((restored.float() - values).abs().max()) < max_relative * float(values.abs().max())


def test_group_map_matches_regular_groups_and_valid_mask_sets_the_range():
    keys = _data("normal")
    packed, scale, zero = quantize_keys(keys, 4, group_size=16)
    regular = dequantize_keys(packed, scale, zero, 4, group_size=16)
    mapped = dequantize_keys(packed, scale, zero, 4, group_size=16, group_map=torch.arange(64) // 16)
    assert torch.equal(regular, mapped)
    per_head = (torch.arange(64) // 16).expand(2, 3, 64)
    assert torch.equal(regular, dequantize_keys(packed, scale, zero, 4, 16, group_map=per_head))
    x = torch.tensor([[0.0, 1.0, 100.0]])
    _, scale, zero = minmax_quantize(x, 8, dim=-1, valid=torch.tensor([[True, True, False]]))
    assert float(scale) * 255 < 1.01 and float(zero) == 0.0  # the masked 100 does not widen the range


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: pack(torch.zeros(2, 3, dtype=torch.uint8), 2), ValueError, "multiple of 4"),
        (lambda: pack(torch.zeros(2, 3, dtype=torch.uint8), 4), ValueError, "multiple of 2"),
        (lambda: pack(torch.zeros(2, 4, dtype=torch.int32), 4), TypeError, "uint8"),
        (lambda: pack(torch.zeros(2, 4, dtype=torch.uint8), 3), ValueError, r"\{8, 4, 2\}, got 3"),
        (lambda: minmax_quantize(torch.randn(4, 8), 1, dim=-1), ValueError, r"\{8, 4, 2\}, got 1"),
        (lambda: quantize_keys(torch.randn(1, 1, 10, 8), 4, group_size=4), ValueError, r"\(10\).*group_size \(4\)"),
        (lambda: quantize_values(torch.randn(1, 1, 4, 12), 4, group_size=8), ValueError, r"head_dim \(12\)"),
        (lambda: quantize_values(torch.randn(1, 1, 4, 6), 2, group_size=6), ValueError, "multiple of 4"),
        (lambda: minmax_quantize(torch.randn(4, 8), 4, -1, scale_dtype=torch.int8), ValueError, "scale_dtype"),
        (lambda: minmax_quantize(torch.full((2, 4), 1e6), 4, -1), ValueError, "bfloat16"),
    ],
    ids=["int2-odd", "int4-odd", "not-uint8", "pack-nbits", "quantize-nbits", "key-tokens", "value-channels",
         "value-pack", "scale-dtype", "fp16-overflow"],
)
def test_bad_sizes_and_arguments_are_rejected_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bfloat16_scales_hold_large_values():
    x = torch.full((2, 4), 1e6) + torch.arange(4.0)
    codes, scale, zero = minmax_quantize(x, 8, -1, scale_dtype=torch.bfloat16)
    assert float(((zero.float() + codes * scale.float()) - x).abs().max()) <= float(scale.max()) / 2
