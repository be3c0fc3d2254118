"""The "kvplus" attention's one pass: SDPA's output and each key's attention mass from the same probabilities."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_kvplus import attention
from hf_kvplus.attention import attend


def _inputs(q_len=7, kv_len=12, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 4, q_len, 16, generator=generator).to(dtype)  # [batch, q_heads, q, d]: 2 groups of 2
    key = torch.randn(2, 2, kv_len, 16, generator=generator).to(dtype)
    value = torch.randn(2, 2, kv_len, 16, generator=generator).to(dtype)
    return query, key, value


def _reference(query, key, value, allowed):
    """SDPA output ([batch, q, q_heads, d]) and the probabilities averaged over each group ([b, kv_heads, q, kv])."""
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    output = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=allowed)
    probs = torch.softmax((query @ k.transpose(-1, -2) / 4.0).masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.nan_to_num(0.0).view(query.shape[0], key.shape[1], groups, *probs.shape[2:]).mean(dim=2)
    return output.transpose(1, 2), probs


@pytest.mark.parametrize("masked", ["none", "bool", "float", "padding"])
def test_output_equals_sdpa_and_mass_equals_the_probabilities(masked):
    query, key, value = _inputs()
    q_len, kv_len = query.shape[2], key.shape[2]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len).expand(2, 1, q_len, kv_len).clone()
    if masked == "padding":
        allowed[1, :, :, :3] = False  # row 1 starts with 3 padding columns
    mask = {"none": None, "bool": allowed, "padding": allowed,
            "float": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))}[masked]
    expected_output, probs = _reference(query, key, value, allowed)
    for reduction, expected in [("sum", probs.sum(dim=2)), ("last", probs[:, :, -1]), ("rows", probs)]:
        output, mass = attend(query, key, value, mask, None, reduction)
        torch.testing.assert_close(output, expected_output, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-5)
    _, window = attend(query, key, value, mask, None, "sum", window=3)
    torch.testing.assert_close(window, probs[:, :, -3:].sum(dim=2), atol=1e-5, rtol=1e-5)
    assert attend(query, key, None, mask, None, "sum")[0] is None


def test_query_blocks_give_the_same_result(monkeypatch):
    query, key, value = _inputs(q_len=12, kv_len=12)
    whole = attend(query, key, value, None, None, "sum", window=5)
    monkeypatch.setattr(attention, "_MAX_QUERIES", 5)  # blocks of 5, 5 and 2 queries
    blocks = attend(query, key, value, None, None, "sum", window=5)
    for got, expected in zip(blocks, whole, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


class _Conversions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.converted = []  # shapes of the tensors converted to another dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_to_copy", "to") and isinstance(args[0], torch.Tensor):
            self.converted.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_half_precision_keys_are_never_copied_to_float32():
    query, key, value = _inputs(dtype=torch.bfloat16)
    with _Conversions() as seen:
        output, mass = attend(query, key, value, None, None, "sum")
    assert mass.dtype == torch.float32 and output.dtype == torch.bfloat16
    assert tuple(key.shape) not in seen.converted and tuple(key.transpose(-1, -2).shape) not in seen.converted
    expected, _ = _reference(query.float(), key.float(), value.float(),
                             torch.ones(7, 12, dtype=torch.bool).tril(5).expand(2, 1, 7, 12))
    torch.testing.assert_close(output.float(), expected, atol=3e-2, rtol=3e-2)


def test_an_unknown_reduction_is_refused():
    query, key, value = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        attend(query, key, value, None, None, "max")
