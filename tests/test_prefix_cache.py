"""PrefixSharedCache on tiny models: no copies, suffix-only prefill, identical outputs, batch ops."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, prompt, tiny_model
from transformers import DynamicCache

import hf_kvplus
from hf_kvplus import PrefixStore
from hf_kvplus._compat import cache_kwargs

NEW = 12


def dense(model, ids, **kwargs):
    kwargs = {"max_new_tokens": NEW, "do_sample": False, **kwargs}
    return model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), **kwargs)


def shared_storages(cache) -> set[int]:
    return {t.untyped_storage().data_ptr() for layer in cache.layers for payload, _, _ in layer.store.segments
            for t in payload[layer.layer_idx].tensors()}


class PrefillCounter:
    """Counts the tokens each forward of the model computes."""

    def __init__(self, model):
        self.tokens = []
        model.register_forward_pre_hook(lambda m, a, kw: self.tokens.append(kw["input_ids"].shape[1]), with_kwargs=True)


def prefill(model, store, ids):
    """One forward over what the store does not hold yet."""
    cache = store.cache_for(model, ids)
    model(ids[:, cache.get_seq_length() :], **cache_kwargs(cache), use_cache=True)
    return cache


def requests(prefix_len=20, suffix_len=6, count=3, seed=0):
    prefix = prompt(length=prefix_len, seed=seed)
    return [torch.cat([prefix, prompt(length=suffix_len, seed=seed + 1 + i)], dim=1) for i in range(count)]


@torch.no_grad()
def test_requests_share_the_prefix_storage_and_prefill_only_the_suffix(model):
    store = PrefixStore(block_size=4)
    counter = PrefillCounter(model)
    caches, outputs = [], []
    for ids in requests():
        cache = store.cache_for(model, ids)
        outputs.append(model.generate(ids, max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache)))
        caches.append(cache)
    assert [caches[i].shared_length > 0 for i in range(3)] == [True] * 3  # all re-read from the store after publishing
    first_forwards = counter.tokens[:: NEW]
    assert first_forwards == [26, 6, 6]  # the 20-token prefix is computed once
    assert shared_storages(caches[1]) & shared_storages(caches[0]) == shared_storages(caches[2]) & shared_storages(caches[0])
    assert shared_storages(caches[1]) & shared_storages(caches[0])  # same storage: no copy
    for ids, out in zip(requests(), outputs, strict=True):
        assert torch.equal(out, dense(model, ids))
    together = hf_kvplus.cache_nbytes(*caches)
    assert together < sum(hf_kvplus.cache_nbytes(c) for c in caches)
    assert together <= hf_kvplus.cache_nbytes(store) + sum(
        hf_kvplus.cache_nbytes(*[t for layer in c.layers for t in layer.store.private.tensors()]) for c in caches
    ) + sum(c.context.token_ids.numel() * 8 for c in caches)


@torch.no_grad()
def test_a_batch_holds_the_shared_prefix_once():
    model = tiny_model("llama-gqa")
    store = PrefixStore(block_size=4)
    model.generate(requests()[0], max_new_tokens=2, **cache_kwargs(store.cache_for(model, requests()[0])))
    batch = torch.cat(requests(count=4, seed=0), dim=0)  # 4 rows: same 20-token prefix, different suffixes
    cache = store.cache_for(model, batch)
    assert cache.shared_length == 20
    layer = cache.layers[0]
    for payload, _, _ in layer.store.segments:
        assert payload[0].get()[0].shape[0] == 1  # one row, expanded on the fly to the batch
    out = model.generate(batch, max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache))
    for row in range(4):
        assert torch.equal(out[row : row + 1], dense(model, batch[row : row + 1]))
    per_token = 2 * 2 * 16 * 4  # k and v, 2 kv heads, head_dim 16, fp32: one token of one layer
    private = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.store.private.tensors())
    assert private == 2 * 4 * (6 + NEW - 1) * per_token  # rows hold only their own tokens
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["tokens_reused"]) == (4, 1, 4 * 20)
    for row in range(4):  # each row's own blocks were published too, for later requests
        assert store.match(out[row]).length == (out.shape[1] - 1) // 4 * 4


@torch.no_grad()
def test_rows_share_only_their_common_prefix_and_padded_rows_share_nothing():
    model = tiny_model("qwen2-mqa")
    store = PrefixStore(block_size=4)
    ids = prompt(batch=2, length=18, seed=4)
    ids[1, :9] = ids[0, :9]
    model.generate(ids[:1], max_new_tokens=1, **cache_kwargs(store.cache_for(model, ids[:1])))
    assert store.cache_for(model, ids).shared_length == 8
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = store.cache_for(model, ids, attention_mask=mask)
    assert cache.shared_length == 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(out[1:, 18:], dense(model, ids[1:, 3:])[:, 15:])
    same = ids[:1].repeat(2, 1)
    with pytest.raises(ValueError, match="left-pads"):
        model.generate(same, attention_mask=mask, max_new_tokens=2, **cache_kwargs(store.cache_for(model, same)))


@torch.no_grad()
def test_chat_turns_reuse_everything_computed_before():
    model = tiny_model("gpt-neox")
    store = PrefixStore(block_size=4)
    history, previous = prompt(length=10, seed=1), None
    for turn in range(3):
        cache = store.cache_for(model, history)
        reused = cache.shared_length
        out = model.generate(history, max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache))
        assert torch.equal(out, dense(model, history))
        if previous is not None:
            assert reused == (previous - 1) // 4 * 4  # every whole block of the last turn, answer included
        previous = out.shape[1]
        history = torch.cat([out, prompt(length=5, seed=10 + turn)], dim=1)


@torch.no_grad()
def test_crop_into_the_prefix_narrows_views_and_never_writes_shared_tensors():
    model = tiny_model("llama-gqa")
    store = PrefixStore(block_size=4)
    ids = requests()[0]
    model.generate(ids, max_new_tokens=2, **cache_kwargs(store.cache_for(model, ids)))
    snapshot = [t.clone() for t in store.tensors()]
    cache = store.cache_for(model, ids)
    model(ids[:, 24:], **cache_kwargs(cache), use_cache=True)
    cache.crop(-7)  # 26 -> 19 tokens: 2 private ones, then 5 shared ones (a partial block is copied out)
    assert (cache.get_seq_length(), cache.shared_length, cache.layers[0].store.private.length) == (19, 16, 3)
    reference = DynamicCache(config=model.config)
    model(ids[:, :19], **cache_kwargs(reference), use_cache=True)
    got = model(ids[:, 19:], **cache_kwargs(cache), use_cache=True).logits
    torch.testing.assert_close(got, model(ids[:, 19:], **cache_kwargs(reference), use_cache=True).logits)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, store.tensors(), strict=True))
    assert store.stats()["referenced_nodes"] > 0


@pytest.mark.parametrize(
    "mode",
    [dict(num_beams=3), dict(do_sample=True, top_k=5, num_return_sequences=2)],
    ids=["beam", "sampling-2-sequences"],
)
@torch.no_grad()
def test_generation_modes_from_a_shared_prefix_match_a_dynamic_cache(mode):
    model = tiny_model("llama-gqa")
    store = PrefixStore(block_size=4)
    ids = requests()[1].repeat(1, 2)
    model.generate(ids, max_new_tokens=1, **cache_kwargs(store.cache_for(model, ids)))
    cache = store.cache_for(model, ids)
    assert cache.shared_length == 48
    mode = {"max_new_tokens": NEW, "do_sample": False, "return_dict_in_generate": True, "output_scores": True, **mode}
    torch.manual_seed(0)
    ours = model.generate(ids, **cache_kwargs(cache), **mode)
    torch.manual_seed(0)
    reference = dense(model, ids, **mode)
    assert torch.equal(ours.sequences, reference.sequences)
    for got, expected in zip(ours.scores, reference.scores, strict=True):  # every beam, every step
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_assisted_decoding_crops_published_speculative_blocks():
    """Prompt lookup appends candidate tokens, publishes their blocks, then crops the rejected ones.

    (Assisted decoding from a cache that already holds tokens is wrong in transformers 5.23 with a
    DynamicCache too: its first forward re-feeds the whole prompt. So the caches here start empty.)
    """
    model = hf_kvplus.attach(tiny_model("llama-gqa"))  # the hook tells the cache each forward's token ids
    store = PrefixStore(block_size=2)
    ids = requests()[1].repeat(1, 2)
    expected = dense(model, ids, prompt_lookup_num_tokens=3)
    for _ in range(2):  # the second run reads blocks the first one published
        cache = hf_kvplus.PrefixSharedCache(model.config, store=store)
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, prompt_lookup_num_tokens=3, **cache_kwargs(cache))
        assert torch.equal(out, expected)
        seen = cache.get_seq_length()
        assert store.match(out[0, :seen]).length == seen // 2 * 2  # every whole block is published, generated too
        assert cache.shared_length >= ids.shape[1] // 2 * 2  # what its forwards of several tokens completed is read


@torch.no_grad()
def test_references_live_with_the_cache_and_end_with_it():
    model = tiny_model("llama-gqa")
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x fp32
    store = PrefixStore(block_size=4, max_bytes=26 * bytes_per_token)
    first, second, third = requests(prefix_len=20, suffix_len=4, count=3)
    cache = store.cache_for(model, first)
    model(first[:, :20], **cache_kwargs(cache), use_cache=True)  # two forwards: two nodes with their own storage
    model(first[:, 20:], **cache_kwargs(cache), use_cache=True)
    assert (store.stats()["tokens_held"], store.stats()["nodes"]) == (24, 2)
    prefill(model, store, second)
    stats = store.stats()  # publishing the second suffix needs room the live first request holds
    assert (stats["rejected_inserts"], stats["tokens_held"], store.match(first).length) == (1, 24, 24)
    del cache
    assert store.stats()["referenced_nodes"] == 0
    prefill(model, store, third)
    assert (store.match(first).length, store.match(third).length) == (20, 24)  # the first suffix was evicted
    assert store.nbytes <= store.max_bytes


@torch.no_grad()
def test_deepcopy_and_reset_give_references_back_and_copies_are_independent():
    model = tiny_model("llama-gqa")
    store = PrefixStore(block_size=4)
    ids = requests()[0]
    prefill(model, store, ids)
    cache = store.cache_for(model, ids)
    twin = copy.deepcopy(cache)
    assert not shared_storages(twin) & shared_storages(cache)
    a = model.generate(ids, max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, do_sample=False, **cache_kwargs(twin)), a)
    cache.release()
    del twin
    assert cache.get_seq_length() == 0 and store.stats()["referenced_nodes"] == 0


@torch.no_grad()
def test_without_a_store_or_token_ids_it_is_a_plain_cache():
    model = tiny_model("llama-gqa")
    ids = prompt(length=20)
    cache = hf_kvplus.PrefixSharedCache(model.config)
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache)), dense(model, ids))
    store = PrefixStore(block_size=4)
    cache = store.cache_for(model, ids)
    embeds = model.get_input_embeddings()(ids)
    model(inputs_embeds=embeds, **cache_kwargs(cache), use_cache=True)
    assert store.stats()["nodes"] == 0 and cache.get_seq_length() == 20  # ids unknown: nothing published
    with pytest.raises(TypeError, match="PrefixStore"):
        hf_kvplus.PrefixSharedCache(model.config, store="shared")
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        store.cache_for(model, torch.rand(1, 4))
    with pytest.raises(ValueError, match="another model"):
        store.cache_for(tiny_model("qwen2-mqa"), torch.randint(0, VOCAB, (1, 8)))


def test_make_cache_shares_the_models_default_store():
    model = tiny_model("llama-gqa")
    cache = hf_kvplus.make_cache("prefix", model)
    assert cache.store is hf_kvplus.prefix_store(model)
    assert hf_kvplus.make_cache("prefix", model.config).store is None
