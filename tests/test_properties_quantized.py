"""Property-based test of packed storage: random appends, shared and per-head evictions, crops and batch
reorders on a QuantizedStore, against a DenseStore fed the same operations.

After every operation: the same tokens in the same order, the full-precision residual exact, every
token within the quantization error, a token once quantized never changes until it is dropped (the
history is append-only, never re-quantized), scale rows bounded by the tokens held, and
``cache_nbytes`` equal to the bytes of the tensors held."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quantized_store import B, D, H, kv

import hf_kvplus
from hf_kvplus.storage.packed import QuantizedStore
from hf_kvplus.storage.base import DenseStore, gather_tokens

MAX_ERROR = {8: 0.02, 4: 0.4, 2: 2.0}  # randn keys and values, groups of at most 4 tokens / channels

operation = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 9)),
    st.tuples(st.sampled_from(["keep-shared", "keep-per-head", "truncate", "select"]), st.integers(0, 2**16)),
)


def quantized_part(store: QuantizedStore) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = store.get()
    nq = store.quantized_length
    return keys[:, :, :nq].clone(), values[:, :, :nq].clone()


@settings(max_examples=60, deadline=None)
@given(
    nbits=st.sampled_from([8, 4, 2]),
    group_size=st.sampled_from([2, 4]),
    residual_groups=st.integers(0, 2),
    operations=st.lists(operation, min_size=1, max_size=16),
)
def test_packed_storage_tracks_a_dense_store(nbits, group_size, residual_groups, operations):
    store = QuantizedStore(nbits, group_size=group_size, residual_length=group_size * residual_groups)
    dense = DenseStore()
    seed = 0
    for op, arg in [("append", 5)] + operations:
        n, nq = store.length, store.quantized_length
        before = quantized_part(store) if n else None  # [B, H, nq, D]: what quantized tokens read as now
        g = torch.Generator().manual_seed(arg)
        if op == "append" or n < 2:
            k, v = kv(arg if op == "append" else 3, seed)
            seed += 1
            store.append(k, v), dense.append(k, v)
            moved = torch.arange(n) if n else None  # old tokens keep their slots
        elif op.startswith("keep"):
            m = int(torch.randint(1, n, (), generator=g))
            shape = (n,) if op == "keep-shared" else (B, H, n)
            moved = torch.rand(shape, generator=g).argsort(-1)[..., :m].sort(-1).values  # sorted, per head or shared
            store.keep(moved), dense.keep(moved)
        elif op == "truncate":
            drop = int(torch.randint(0, n, (), generator=g))
            store.truncate(drop), dense.truncate(drop)
            moved = torch.arange(n - drop)
        else:
            rows = torch.randint(0, B, (B,), generator=g)
            store.select_batch(rows), dense.select_batch(rows)
            moved = torch.arange(n)
            before = tuple(t.index_select(0, rows) for t in before)

        keys, values = store.get()
        dense_keys, dense_values = dense.get()
        assert store.length == dense.length and keys.shape == dense_keys.shape == (B, H, dense.length, D)
        r = store.residual  # the newest tokens, in full precision
        assert torch.equal(keys[:, :, keys.shape[2] - r :], dense_keys[:, :, keys.shape[2] - r :])
        assert torch.equal(values[:, :, keys.shape[2] - r :], dense_values[:, :, keys.shape[2] - r :])
        assert float((keys - dense_keys).abs().max()) < MAX_ERROR[nbits]
        assert float((values - dense_values).abs().max()) < MAX_ERROR[nbits]
        if before is not None and nq:  # tokens that were quantized read exactly as before, wherever they moved
            index = moved.expand(B, H, -1) if moved.dim() == 1 else moved  # [B, H, kept old tokens]
            was_quantized = index < nq
            for now, old in zip((keys, values), before):
                old_here = gather_tokens(old, index.clamp(max=nq - 1))  # [B, H, m, D]
                now_here = now[:, :, : index.shape[-1]]
                assert torch.equal(now_here[was_quantized], old_here[was_quantized])
        if store.key_scale is not None:
            assert store.key_scale.shape[2] <= store.quantized_length
        held = store.tensors()
        assert hf_kvplus.cache_nbytes(store) == sum(t.untyped_storage().nbytes() for t in held)
