"""QuantizedStore: append-only quantization, lossless eviction and batch ops, exact byte counts."""

from __future__ import annotations

import pytest
import torch

import hf_kvplus.storage.packed as quantized_store
from hf_kvplus.storage.packed import QuantizedStore
from hf_kvplus.storage.base import DenseStore, gather_tokens

B, H, D = 2, 3, 16


def kv(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)


def filled(nbits=4, n=45, group_size=4, residual_length=8, chunks=(20, 1, 1, 23)):
    store, dense, seed = QuantizedStore(nbits, group_size, residual_length), DenseStore(), 0
    for size in chunks:
        k, v = kv(size, seed)
        store.append(k, v), dense.append(k, v)
        seed += 1
    assert store.length == dense.length == n
    return store, dense


@pytest.mark.parametrize(("nbits", "max_error"), [(8, 0.02), (4, 0.4), (2, 2.0)])
def test_update_returns_new_tokens_exactly_and_history_close(nbits, max_error):
    store, dense = filled(nbits)
    k, v = kv(3, seed=9)
    before = store.get()
    keys, values = store.update(k, v)
    dense.append(k, v)
    assert torch.equal(keys[:, :, -3:], k) and torch.equal(values[:, :, -3:], v)
    assert torch.equal(keys[:, :, :-3], before[0]) and torch.equal(values[:, :, :-3], before[1])
    ref_keys, ref_values = dense.get()
    assert float((store.get()[0] - ref_keys).abs().max()) < max_error
    assert float((store.get()[1] - ref_values).abs().max()) < max_error
    assert not torch.equal(store.get()[0], ref_keys)  # really quantized


@pytest.mark.parametrize(
    ("group_size", "residual_length", "appended", "quantized", "residual"),
    [(4, 8, 7, 0, 7), (4, 8, 11, 0, 11), (4, 8, 12, 4, 8), (4, 8, 45, 36, 9), (32, 0, 70, 64, 6), (8, 16, 200, 184, 16)],
)
def test_residual_holds_the_newest_tokens_and_history_is_whole_groups(group_size, residual_length, appended,
                                                                       quantized, residual):
    store = QuantizedStore(4, group_size, residual_length)
    for i in range(appended):
        store.append(*kv(1, seed=i))
    assert (store.quantized_length, store.residual) == (quantized, residual)
    assert residual_length <= store.residual < residual_length + group_size or appended < residual_length


def test_history_is_quantized_once_and_never_again(monkeypatch):
    calls = []
    real = quantized_store.quantize_keys
    monkeypatch.setattr(quantized_store, "quantize_keys", lambda x, *a, **k: calls.append(x.shape[2]) or real(x, *a, **k))
    store = QuantizedStore(2, group_size=4, residual_length=8)
    store.append(*kv(30, 0))
    first = store.get()[0][:, :, :20].clone()
    for i in range(50):
        store.append(*kv(1, seed=i + 1))
    assert sum(calls) == store.quantized_length == 72  # every quantized token went through exactly once
    assert max(calls) == 20 and calls.count(4) == 13  # the prefill's 5 groups, then one group per 4 steps
    assert torch.equal(store.get()[0][:, :, :20], first)  # old tokens bit-identical


def _check_against_dense(store, dense, max_error):
    keys, values = store.get()
    assert keys.shape == dense.get()[0].shape
    assert float((keys - dense.get()[0]).abs().max()) < max_error
    assert float((values - dense.get()[1]).abs().max()) < max_error


@pytest.mark.parametrize("index_kind", ["shared", "per-head-uniform", "per-head-ragged"])
@pytest.mark.parametrize(("nbits", "max_error"), [(8, 0.02), (4, 0.4), (2, 2.0)])
def test_keep_is_lossless_and_frees_memory(index_kind, nbits, max_error):
    store, dense = filled(nbits)
    nq, n = store.quantized_length, store.length
    g = torch.Generator().manual_seed(1)
    if index_kind == "shared":
        index = torch.randperm(n, generator=g)[:20].sort().values
    elif index_kind == "per-head-uniform":  # every head keeps 16 history tokens and the whole residual
        hist = torch.rand(B, H, nq, generator=g).argsort(-1)[..., :16].sort(-1).values
        index = torch.cat([hist, torch.arange(nq, n).expand(B, H, -1)], dim=-1)
    else:  # heads keep different numbers of quantized tokens
        index = torch.rand(B, H, n, generator=g).argsort(-1)[..., :20].sort(-1).values
    before = [gather_tokens(t, index) for t in store.get()]
    bytes_before = sum(t.nbytes for t in store.tensors())
    store.keep(index), dense.keep(index)
    after = store.get()
    fresh = torch.zeros(B, H, index.shape[-1], dtype=torch.bool)
    if index_kind == "per-head-ragged":  # residual tokens that landed among the history were quantized now
        counts = (index < nq).sum(-1, keepdim=True)
        split = int(counts.max())
        assert int(counts.min()) < split and store.quantized_length == split
        fresh[..., :split] = index[..., :split] >= nq
        assert fresh.any()
    for got, expected in zip(after, before):
        assert torch.equal(got[~fresh], expected[~fresh])  # kept tokens are unchanged: no round trip
    _check_against_dense(store, dense, max_error)
    # Memory is really freed: every per-token tensor holds exactly the kept tokens.
    kept_history = store.quantized_length
    assert store.residual == index.shape[-1] - kept_history
    for tensor in (store.key_codes, store.value_codes, store.value_scale, store.value_zero):
        assert tensor.shape[:3] == (B, H, kept_history)
    groups = store.key_groups
    assert groups is not None and groups.shape[-1] == kept_history
    assert store.key_scale.shape[2] == len(torch.unique(groups)) <= kept_history  # no unreferenced scale row
    assert sum(t.nbytes for t in store.tensors()) < bytes_before


def test_dropping_whole_key_groups_frees_their_scales():
    store, _ = filled(4)
    assert store.key_scale.shape[2] == 9 and store.key_groups is None
    store.keep(torch.cat([torch.arange(9, 10), torch.arange(16, store.length)]))  # keeps 1 token of group 2, groups 4-8
    assert store.key_scale.shape[2] == 6 and store.key_groups.dtype == torch.int32
    assert store.key_groups.tolist() == [0] + [1 + i // 4 for i in range(20)]


def test_truncate_and_select_batch_are_exact():
    store, dense = filled(2)
    keys, values = store.get()
    store.truncate(3)
    assert torch.equal(store.get()[0], keys[:, :, :-3]) and store.residual == 6
    store.truncate(10)  # into the history: a partial key group remains
    assert torch.equal(store.get()[1], values[:, :, :-13]) and store.quantized_length == 32
    rows = torch.tensor([1, 1])
    expected = [t[rows] for t in store.get()]
    store.select_batch(rows)
    assert all(torch.equal(got, want) for got, want in zip(store.get(), expected))
    store.append(*kv(12, 3))  # and keeps working: new groups after a partial one
    assert store.get()[0].shape == (2, H, 44, D) and store.key_scale.shape[0] == 2


@pytest.mark.parametrize(("nbits", "group_size", "bits"), [(8, 16, 10.0), (4, 16, 6.0), (4, 64, 4.5), (2, 32, 3.0)])
def test_effective_bits_of_the_history(nbits, group_size, bits):
    store = QuantizedStore(nbits, group_size, residual_length=group_size)
    store.append(torch.randn(1, 2, 8 * group_size + 5, 64), torch.randn(1, 2, 8 * group_size + 5, 64))
    elements = 2 * 2 * store.quantized_length * 64
    assert sum(t.nbytes for t in store.history_tensors()) * 8 / elements == bits  # nbits + 32 / group_size


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(nbits=3), r"nbits must be one of \{8, 4, 2\}, got 3"),
        (dict(nbits=4, group_size=0), "group_size must be an integer >= 1, got 0"),
        (dict(nbits=4, group_size=32, residual_length=48), r"residual_length \(48\) must be a multiple of group_size \(32\)"),
        (dict(nbits=4, residual_length=-1), "residual_length must be an integer >= 0, got -1"),
        (dict(nbits=4, scale_dtype=torch.int8), "scale_dtype must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedStore(**kwargs)


@pytest.mark.parametrize(("pattern", "max_rows"), [("sinks+recent", 6), ("per-head-scattered", 12)])
def test_scale_rows_stay_bounded_under_eviction(pattern, max_rows):
    """Bytes under eviction: recency keeps at most a couple of partial key groups; scattered per-head
    eviction at most one scale row per kept quantized token of a head (``docs/strategies/quantized.md``)."""
    store, budget, g = QuantizedStore(2, group_size=4, residual_length=8), 20, torch.Generator().manual_seed(0)
    for step in range(120):
        store.append(*kv(1, seed=step))
        n = store.length
        if n > budget:
            if pattern == "sinks+recent":
                store.keep(torch.cat([torch.arange(2), torch.arange(n - budget + 2, n)]))
            else:  # heavy-hitter-like: random old tokens per head, the residual kept
                old = torch.rand(B, H, n - 8, generator=g).argsort(-1)[..., : budget - 8].sort(-1).values
                store.keep(torch.cat([old, torch.arange(n - 8, n).expand(B, H, -1)], dim=-1))
        assert store.key_scale is None or store.key_scale.shape[2] <= max_rows
    assert store.length == budget and store.residual >= 8
    if pattern == "sinks+recent":
        assert store.key_groups.dim() == 1  # one map shared by every row and head: 4 bytes per token


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_track_a_dense_store(seed):
    """Appends, shared and per-head evictions, crops and beam reorders in random order."""
    g = torch.Generator().manual_seed(seed)
    store, dense = QuantizedStore(4, group_size=4, residual_length=8), DenseStore()
    for step in range(80):
        op = int(torch.randint(0, 10, (), generator=g))
        n = store.length
        if op < 5 or n < 6:
            k, v = kv(int(torch.randint(1, 12, (), generator=g)), seed=1000 * seed + step)
            store.append(k, v), dense.append(k, v)
        elif op < 8:
            m = int(torch.randint(1, n, (), generator=g))
            shape = (n,) if op == 5 else (B, H, n)
            index = torch.rand(shape, generator=g).argsort(-1)[..., :m].sort(-1).values
            store.keep(index), dense.keep(index)
        elif op < 9:
            crop = int(torch.randint(0, n, (), generator=g))
            store.truncate(crop), dense.truncate(crop)
        else:
            rows = torch.randint(0, B, (B,), generator=g)
            store.select_batch(rows), dense.select_batch(rows)
        assert store.length == dense.length
        _check_against_dense(store, dense, 0.4)
        if store.key_groups is not None:  # maps ascend along tokens (the per-head renumbering relies on it)
            assert bool((store.key_groups[..., 1:] >= store.key_groups[..., :-1]).all())
            assert store.key_scale.shape[2] <= store.quantized_length
