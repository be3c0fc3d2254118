"""Split (cascade) attention over a shared prefix: exact against SDPA and ``DynamicCache``, and no prefix copy per step.

A prefix-shared cache hands out its keys and values as parts (:class:`~hf_kvplus.storage.split.SplitKV`);
the ``"kvplus"`` attention attends the prefix once for the whole batch and merges with each row's own
tokens by log-sum-exp (:mod:`hf_kvplus.cascade`). Any other reader gets the concatenation.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import prompt, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import hf_kvplus
import hf_kvplus._compat as compat
from hf_kvplus import PrefixStore
from hf_kvplus._compat import attn_implementation, cache_kwargs
from hf_kvplus.cascade import split_attention
from hf_kvplus.storage.base import DenseStore
from hf_kvplus.storage.shared import SharedPrefixStore
from hf_kvplus.storage.split import SplitKV

# dtype -> (atol, rtol) against SDPA over the concatenation (float32 reference)
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _parts(batch, own, windows, dtype, kv_heads=2, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = [torch.randn(1, kv_heads, n, head_dim, generator=g).to(dtype) for n in windows]
    values = [torch.randn(1, kv_heads, n, head_dim, generator=g).to(dtype) for n in windows]
    own_k = torch.randn(batch, kv_heads, own, head_dim, generator=g).to(dtype)
    own_v = torch.randn(batch, kv_heads, own, head_dim, generator=g).to(dtype)
    return SplitKV(shared, own_k), SplitKV(values, own_v)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-kernel", "aten-math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("batch", "q_len", "own", "mask"),
    [(1, 1, 3, None), (4, 1, 3, None), (4, 1, 5, "padded"), (4, 6, 6, None), (3, 6, 9, None), (3, 6, 9, "padded"),
     (2, 6, 9, "float")],
)
def test_split_attention_is_sdpa_over_the_concatenation(monkeypatch, fused, dtype, batch, q_len, own, mask):
    if not fused:
        monkeypatch.setattr(compat, "_FLASH_CPU", None)
    key, value = _parts(batch, own, [7, 9], dtype)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(batch, 6, q_len, 16, generator=g).to(dtype)  # 3 query heads per KV head
    length = key.shape[2]
    allowed = torch.ones(q_len, length, dtype=torch.bool).tril(length - q_len).expand(batch, 1, q_len, length).clone()
    attention_mask = None
    if mask is not None:
        allowed[0, :, :, 2] = False  # a column of the prefix hidden from row 0, one of its own tokens from row 1
        allowed[1 % batch, :, :, length - own] = False
        attention_mask = allowed
        if mask == "float":
            attention_mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    got = split_attention(query, key, value, attention_mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.full().float(), value.full().float(), attn_mask=allowed, scale=0.3, enable_gqa=True
    ).transpose(1, 2)  # [batch, q, heads, head_dim]
    assert got.shape == expected.shape and got.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


def test_update_hands_out_parts_that_concatenate_for_any_other_reader():
    prefix = DenseStore()
    prefix.append(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
    payload = [prefix]  # one store per layer; the halves of a split tree node share it
    store = SharedPrefixStore(0, [(payload, 0, 5), (payload, 5, 8)], DenseStore, batch_size=3)
    own = torch.randn(3, 2, 2, 4)
    keys, values = store.update(own, own + 1)
    assert isinstance(keys, SplitKV) and keys.shape == (3, 2, 10, 4)
    assert len(keys.shared) == 1  # adjacent windows of one payload are read as one view
    assert keys.shared[0].data_ptr() == prefix.keys.data_ptr()  # a view of the store's tensor, not a copy
    expected = torch.cat([prefix.keys.expand(3, -1, -1, -1), own], dim=2)
    summed = keys + 0  # any op builds the concatenation once and returns a plain tensor
    assert type(summed) is torch.Tensor and torch.equal(summed, expected)
    assert torch.equal(values[:, :, -2:], own + 1) and torch.equal(store.get()[0], expected)
    with torch.enable_grad():  # autograd recording: plain tensors
        grad_keys = torch.randn(3, 2, 1, 4, requires_grad=True)
        assert type(store.update(grad_keys, grad_keys)[0]) is torch.Tensor


@torch.no_grad()
def _run(model, cache, ids, steps):
    """Prefill ``ids`` past what ``cache`` holds, then ``steps`` greedy steps: every forward's last logits, and tokens."""
    logits, tokens = [], []
    out = model(ids[:, cache.get_seq_length() :], **cache_kwargs(cache), use_cache=True).logits
    logits.append(out[:, -2:])  # positions of the suffix every cache computes
    for _ in range(steps):
        token = out[:, -1:].argmax(-1)
        tokens.append(token)
        out = model(token, **cache_kwargs(cache), use_cache=True).logits
        logits.append(out)
    return logits, torch.cat(tokens, dim=1) if tokens else None


def _warm_store(model, prefix_len, block_size=4):
    store = PrefixStore(block_size=block_size)
    first = torch.cat([prompt(length=prefix_len, seed=0), prompt(length=2, seed=9)], dim=1)
    _run(model, store.cache_for(model, first), first, 0)  # publishes the prefix's blocks
    return store


@pytest.mark.parametrize("batch", [1, 4])
def test_split_path_matches_dynamic_cache_and_the_concatenated_path(batch, monkeypatch):
    """Prefill of the suffix (many queries) and decode, against DynamicCache and the same cache read concatenated."""
    built = []
    full = SplitKV.full
    monkeypatch.setattr(SplitKV, "full", lambda self: built.append(self.numel()) or full(self))
    model = tiny_model("llama-gqa")
    store = _warm_store(model, 20)
    ids = torch.cat([prompt(length=20, seed=0).expand(batch, -1), prompt(batch=batch, length=6, seed=3)], dim=1)
    cache = store.cache_for(model, ids)
    assert cache.shared_length == 20 and attn_implementation(model) == "sdpa"  # switched only during its forwards
    split_logits, split_tokens = _run(model, cache, ids, 8)
    assert built == [] and attn_implementation(model) == "sdpa"  # the split path ran; the user's "sdpa" is back
    # One row adopts the block its prefill completed; decoding steps publish copies and keep reading their own tokens.
    assert cache.shared_length == (24 if batch == 1 else 20)
    assert cache.shared_length + cache.layers[0].store.private.length == 26 + 8

    dense_logits, dense_tokens = _run(model, DynamicCache(config=model.config), ids, 8)
    concat_cache = _warm_store(model, 20).cache_for(model, ids)  # the same state, read by transformers' eager
    model.set_attn_implementation("eager")  # attention: it gets the concatenation the parts build (no split path)
    concat_logits, concat_tokens = _run(model, concat_cache, ids, 8)
    assert torch.equal(split_tokens, dense_tokens) and torch.equal(split_tokens, concat_tokens)
    for got, dense, concat in zip(split_logits, dense_logits, concat_logits, strict=True):
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, concat, atol=1e-5, rtol=1e-5)


def test_bf16_split_path_stays_close_to_dynamic_cache():
    model = tiny_model("qwen2-mqa").to(torch.bfloat16)
    store = _warm_store(model, 16)
    ids = torch.cat([prompt(length=16, seed=0).expand(2, -1), prompt(batch=2, length=5, seed=4)], dim=1)
    split_logits, _ = _run(model, store.cache_for(model, ids), ids, 4)
    dense_logits, _ = _run(model, DynamicCache(config=model.config), ids, 4)
    for got, dense in zip(split_logits, dense_logits, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), dense.float(), atol=5e-2, rtol=5e-2)


@torch.no_grad()
def test_beam_search_and_crop_into_the_prefix_on_the_split_path():
    model = tiny_model("llama-gqa")
    store = _warm_store(model, 20)
    ids = torch.cat([prompt(length=20, seed=0), prompt(length=5, seed=5)], dim=1)
    mode = {"max_new_tokens": 6, "do_sample": False, "num_beams": 3}
    beams = model.generate(ids, **cache_kwargs(store.cache_for(model, ids)), **mode)
    assert torch.equal(beams, model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), **mode))
    cache = store.cache_for(model, ids)
    assert cache.shared_length == 24  # the beam search run published the suffix's first block
    model(ids[:, 24:], **cache_kwargs(cache), use_cache=True)
    cache.crop(-7)  # 25 -> 18 tokens: 1 own one, then 6 of the prefix (a partial block, copied out)
    assert (cache.shared_length, cache.layers[0].store.private.length) == (16, 2)
    reference = DynamicCache(config=model.config)
    model(ids[:, :18], **cache_kwargs(reference), use_cache=True)
    got = model(ids[:, 18:], **cache_kwargs(cache), use_cache=True).logits
    torch.testing.assert_close(got, model(ids[:, 18:], **cache_kwargs(reference), use_cache=True).logits,
                               atol=1e-5, rtol=1e-5)


class _Allocations(TorchDispatchMode):
    """Ops that do work, and the elements of every floating-point tensor they return (a KV copy shows as O(prefix)).

    The cache's token ids (``int64`` on the CPU, ``[batch, seen]``) are still concatenated at every step, so
    integer tensors are left out.
    """

    def __init__(self):
        super().__init__()
        self.ops, self.elements = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
            self.elements += sum(t.numel() for t in torch.utils._pytree.tree_leaves(out)
                                 if isinstance(t, torch.Tensor) and t.is_floating_point())
        return out


@torch.no_grad()
def _decode_step_cost(model, prefix_len: int, attention: str = "kvplus") -> _Allocations:
    """Ops and allocated elements of one decoding step of 4 rows sharing a ``prefix_len``-token prefix."""
    store = _warm_store(model, prefix_len, block_size=16)
    ids = torch.cat([prompt(length=prefix_len, seed=0).expand(4, -1), prompt(batch=4, length=3, seed=7)], dim=1)
    cache = store.cache_for(model, ids)
    model.set_attn_implementation(attention)
    assert cache.shared_length == prefix_len
    _run(model, cache, ids, 3)
    token = torch.full((4, 1), 5)
    with _Allocations() as counted:
        model(token, **cache_kwargs(cache), use_cache=True)
    return counted


def test_a_decoding_step_copies_no_prefix(monkeypatch):
    """Ops and allocated elements of a step do not depend on the prefix length, and no concatenation is built;
    transformers' eager attention, given the same parts, builds the concatenation (the whole prefix, per row) in every
    layer. (An "sdpa" model runs the split path: the model hook switches it to "kvplus" for the cache's forwards.)"""
    built = []
    full = SplitKV.full
    monkeypatch.setattr(SplitKV, "full", lambda self: built.append(self.numel()) or full(self))
    model = tiny_model("llama-gqa")
    short, long = _decode_step_cost(model, 64), _decode_step_cost(model, 256)
    assert short.ops == long.ops and short.elements == long.elements
    assert short.ops["_scaled_dot_product_flash_attention_for_cpu"] == 2 * 2  # prefix and own part, in each layer
    assert built == []
    _decode_step_cost(model, 256, "eager")
    assert len(built) >= 2 * 2 and min(built) >= 4 * 2 * 256 * 16  # keys and values of 2 layers: 4 rows x 256+ tokens


def test_attach_switches_only_sdpa_models_to_split_attention():
    model = tiny_model("llama-gqa")
    model.set_attn_implementation("eager")
    store = _warm_store(model, 8)
    assert attn_implementation(model) == "eager"  # left as it is: eager attention reads the concatenation
    ids = torch.cat([prompt(length=8, seed=0), prompt(length=3, seed=2)], dim=1)
    got, _ = _run(model, store.cache_for(model, ids), ids, 3)
    expected, _ = _run(model, DynamicCache(config=model.config), ids, 3)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert attn_implementation(model) == "eager"
    hf_kvplus.detach(model)
