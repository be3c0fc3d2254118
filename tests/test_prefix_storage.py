"""The shared prefix in another storage format: any KVStore plugs into PrefixStore(store_factory=...).

A float16 store stands in for a custom format, and ``nbits=4`` uses the packed QuantizedStore: published
blocks are re-encoded by the factory, every request reads the same encoded tensors, and the store
counts their real size.
"""

from __future__ import annotations

import torch
from conftest import prompt, tiny_model

import hf_kvplus
from hf_kvplus import KVStore, PrefixStore
from hf_kvplus._compat import cache_kwargs


class HalfStore(KVStore):
    """Keeps float16, gives float32 back: a lossy format like a quantized one."""

    def __init__(self):
        self.keys = self.values = None  # [batch, kv_heads, tokens, head_dim] float16

    def append(self, keys, values):
        keys, values = keys.half(), values.half()
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=-2)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=-2)

    def get(self):
        return self.keys.float(), self.values.float()

    def keep(self, index):
        self.keys, self.values = self.keys.index_select(2, index), self.values.index_select(2, index)

    def truncate(self, num_tokens):
        self.keys, self.values = self.keys[:, :, : self.length - num_tokens], self.values[:, :, : self.length - num_tokens]

    def select_batch(self, index):
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)

    def tensors(self):
        return [t for t in (self.keys, self.values) if t is not None]

    @property
    def length(self):
        return 0 if self.keys is None else self.keys.shape[-2]


@torch.no_grad()
def test_a_prefix_held_in_another_format_is_shared_and_counted_at_its_size(tmp_path):
    model = tiny_model("llama-gqa")
    prefix = prompt(length=20, seed=1)
    first, second = (torch.cat([prefix, prompt(length=6, seed=s)], dim=1) for s in (2, 3))
    dense, half = PrefixStore(block_size=4), PrefixStore(block_size=4, store_factory=HalfStore)
    for store in (dense, half):
        model(first, **cache_kwargs(store.cache_for(model, first)), use_cache=True)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x fp32
    assert dense.nbytes == 26 * per_token  # views of the 26-token prefill (24 published + a 2-token partial block)
    assert half.nbytes == 24 * per_token // 2  # re-encoded: exactly the 24 published tokens, at 2 bytes each
    caches = [half.cache_for(model, second) for _ in range(2)]
    ptrs = [{t.untyped_storage().data_ptr() for p, _, _ in c.layers[0].store.segments for t in p[0].tensors()} for c in caches]
    assert ptrs[0] == ptrs[1] and all(t.dtype == torch.float16 for p, _, _ in caches[0].layers[0].store.segments
                                      for t in p[0].tensors())
    logits = model(second[:, 20:], **cache_kwargs(caches[0]), use_cache=True).logits
    reference = model(second).logits[:, 20:]
    torch.testing.assert_close(logits, reference, atol=5e-3, rtol=0)  # float16 prefix: close, not equal
    assert not torch.equal(logits, reference)
    half.save(tmp_path / "half.safetensors")  # saved in the model's dtype, re-encoded by the factory on load
    loaded = PrefixStore.load(tmp_path / "half.safetensors", model, store_factory=HalfStore)
    assert loaded.nbytes == half.nbytes == hf_kvplus.cache_nbytes(loaded)


@torch.no_grad()
def test_a_prefix_in_packed_int4_is_shared_counted_and_close():
    model = tiny_model("llama-gqa")
    prefix = prompt(length=20, seed=1)
    first, second = (torch.cat([prefix, prompt(length=6, seed=s)], dim=1) for s in (2, 3))
    dense, packed = PrefixStore(block_size=4), PrefixStore(block_size=4, nbits=4)
    for store in (dense, packed):
        model(first, **cache_kwargs(store.cache_for(model, first)), use_cache=True)
    caches = [packed.cache_for(model, second) for _ in range(2)]
    tensors = [[t for p, _, _ in c.layers[0].store.segments for t in p[0].tensors()] for c in caches]
    assert {t.untyped_storage().data_ptr() for t in tensors[0]} == {t.untyped_storage().data_ptr() for t in tensors[1]}
    assert any(t.dtype == torch.uint8 for t in tensors[0])  # packed codes, not a float copy
    assert packed.nbytes < dense.nbytes / 2
    assert packed.nbytes == hf_kvplus.cache_nbytes(packed)
    logits = model(second[:, 20:], **cache_kwargs(caches[0]), use_cache=True).logits
    reference = model(second).logits[:, 20:]
    torch.testing.assert_close(logits, reference, atol=0.1, rtol=0)
