"""The decoding hot path of packed storage (issue 15): few-op dequantization into a shared scratch equals the
eager reference for every bit width and layout, across flushes, with buffers grown by doubling."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.storage.packed import QuantizedStore
from hf_kvplus.quant.fused import DequantScratch


def _pair(nbits, group_size, residual_length, dtype=torch.float32):
    shared = QuantizedStore(nbits, group_size, residual_length, scratch=DequantScratch())
    eager = QuantizedStore(nbits, group_size, residual_length)
    return shared, eager


@pytest.mark.parametrize("nbits", [8, 4, 2])
@pytest.mark.parametrize("head_dim,group_size", [(16, 4), (32, 8), (64, 64)])  # value groups inside / across slots
@torch.no_grad()
def test_fast_steps_equal_the_eager_reference_across_flushes(nbits, head_dim, group_size):
    g = torch.Generator().manual_seed(nbits + head_dim)
    fast, eager = _pair(nbits, group_size, 2 * group_size)
    first = torch.randn(2, 3, 3 * group_size + 1, head_dim, generator=g)  # an odd prompt length
    fast.append(first, first * 0.5)
    eager.append(first, first * 0.5)
    for _ in range(3 * group_size + 3):  # several flushes and one capacity doubling
        k, v = torch.randn(2, 3, 1, head_dim, generator=g), torch.randn(2, 3, 1, head_dim, generator=g)
        got, want = fast.update(k, v), eager.update(k, v)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(a, b)
        assert fast.quantized_length == eager.quantized_length
    for a, b in zip(fast.get(), eager.get()):
        assert torch.equal(a, b)


def test_capacity_doubles_and_keeps_contents():
    store = QuantizedStore(4, 4, 4, scratch=DequantScratch())  # hot-path stores grow by doubling
    x = torch.randn(1, 2, 8, 16)
    store.append(x, x)
    kept = [t.clone() for t in store.history_tensors()]
    capacity = store._codes.shape[3]
    store.append(torch.randn(1, 2, 4 * capacity, 16), torch.randn(1, 2, 4 * capacity, 16))
    assert store._codes.shape[3] >= 2 * capacity and store._codes.shape[3] & (store._codes.shape[3] - 1) == 0
    for old, new in zip(kept, store.history_tensors()):
        assert torch.equal(new[:, :, : old.shape[2]], old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_shared_scratch_gives_the_logits_of_the_eager_path(dtype):
    model = tiny_model("llama-gqa").to(dtype)
    ids = prompt(batch=2, length=37)
    logits = []
    for fast in (True, False):
        cache = hf_kvplus.make_cache("quantized", model, nbits=4, group_size=4, residual_length=4)
        if not fast:
            for layer in cache.layers:
                layer.store_factory = hf_kvplus.quantized.quantized_store_factory(4, 4, 4)
        out = model(ids, **cache_kwargs(cache), use_cache=True)
        token, steps = out.logits[:, -1:].argmax(-1), []
        for _ in range(11):
            out = model(token, **cache_kwargs(cache), use_cache=True)
            steps.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
        logits.append(torch.stack(steps))
    tolerance = 0 if dtype == torch.float32 else 0.05  # bf16: addcmul rounds once, the eager path twice
    assert float((logits[0].float() - logits[1].float()).abs().max()) <= tolerance


@torch.no_grad()
def test_batch_ops_and_crop_after_fast_steps_are_exact():
    g = torch.Generator().manual_seed(1)
    fast, eager = _pair(4, 4, 4)
    x = torch.randn(3, 2, 13, 16, generator=g)
    for store in (fast, eager):
        store.append(x, x)
    for _ in range(6):
        k = torch.randn(3, 2, 1, 16, generator=g)
        fast.update(k, k), eager.update(k, k)
    for op in (lambda s: s.select_batch(torch.tensor([2, 0, 0])), lambda s: s.truncate(3), lambda s: s.truncate(9)):
        op(fast), op(eager)
        for a, b in zip(fast.get(), eager.get()):
            assert torch.equal(a, b)
        k = torch.randn(3, 2, 1, 16, generator=g)
        for a, b in zip(fast.update(k, k), eager.update(k, k)):
            assert torch.equal(a, b)
