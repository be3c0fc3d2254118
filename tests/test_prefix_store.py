"""PrefixPool as a plain data structure (no model): tables of insert / match / evict cases.

The KV given for a token is ``[token id, position]`` (in every head and layer), so a match can be
checked for being exactly the right tokens at the right positions.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_kvplus
from hf_kvplus.prefix import PrefixPool

LAYERS, HEADS, BLOCK = 2, 2, 2
NODE_BYTES_PER_TOKEN = LAYERS * 2 * HEADS * 2 * 4  # layers x (k, v) x heads x [id, pos] x fp32


def kv_for(tokens):
    """``kv(start, stop)`` giving keys/values ``[1, heads, n, 2]`` that encode (token id, position)."""

    def kv(start, stop):
        ids = torch.tensor(tokens[start:stop], dtype=torch.float32)
        pos = torch.arange(start, stop, dtype=torch.float32)
        enc = torch.stack([ids, pos], dim=-1).expand(1, HEADS, -1, 2)
        return [(enc.clone(), enc.clone() + 0.5) for _ in range(LAYERS)]

    return kv


def insert(store, tokens, acquire=False):
    return store.insert(tokens, kv_for(list(tokens)), acquire=acquire)


def window_tokens(found, layer=0):
    """(token ids, positions) read back from a match's windows."""
    if not found.segments:
        return [], []
    keys = torch.cat([payload[layer].get()[0][:, :, a:b] for payload, a, b in found.segments], dim=2)
    return keys[0, 0, :, 0].int().tolist(), keys[0, 0, :, 1].int().tolist()


MATCH_CASES = [
    # (sequences inserted, query, limit, tokens matched)
    ([], [1, 2, 3, 4], None, 0),
    ([[1, 2, 3, 4]], [1, 2, 3, 4], None, 4),
    ([[1, 2, 3, 4]], [1, 2, 3, 5], None, 2),  # block granularity: the partial block is not reused
    ([[1, 2, 3, 4]], [1, 2], None, 2),
    ([[1, 2, 3, 4]], [1], None, 0),
    ([[1, 2, 3, 4]], [9, 2, 3, 4], None, 0),
    ([[1, 2, 3, 4]], [1, 2, 3, 4], 3, 2),  # limit: never more than `limit` tokens
    ([[1, 2, 3]], [1, 2, 3, 4], None, 2),  # a partial last block is not inserted
    ([[1, 2, 3, 4, 5, 6]], [1, 2, 3, 4, 7, 8], None, 4),  # match inside one node's edge
    ([[1, 2, 3, 4], [1, 2, 5, 6]], [1, 2, 5, 6, 7, 8], None, 4),
    ([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8]], [1, 2, 3, 4, 5, 6], None, 6),  # after a split
    ([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8]], [1, 2, 3, 4, 7, 8, 9], None, 6),
]


@pytest.mark.parametrize(("inserted", "query", "limit", "expected"), MATCH_CASES)
def test_match(inserted, query, limit, expected):
    store = PrefixPool(block_size=BLOCK)
    for tokens in inserted:
        insert(store, tokens)
    found = store.match(query, limit=limit)
    assert found.length == expected
    assert window_tokens(found) == (query[:expected], list(range(expected)))


INSERT_CASES = [
    # (sequences inserted in order, nodes, tokens held, tokens given by kv() overall)
    ([[1, 2, 3, 4]], 1, 4, 4),
    ([[1, 2, 3, 4], [1, 2, 3, 4]], 1, 4, 4),  # already cached: kv() is not asked
    ([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]], 2, 6, 6),  # extends a leaf
    ([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8]], 3, 8, 8),  # split: head [1..4], tails [5, 6] and [7, 8]
    ([[1, 2, 3, 4, 5, 6], [1, 2]], 2, 6, 6),  # a prefix of a node splits it, nothing new
    ([[1, 2], [3, 4], [5, 6]], 3, 6, 6),
]


@pytest.mark.parametrize(("inserted", "nodes", "held", "given"), INSERT_CASES)
def test_insert(inserted, nodes, held, given):
    store = PrefixPool(block_size=BLOCK)
    asked = []
    for tokens in inserted:
        kv = kv_for(tokens)
        store.insert(tokens, lambda a, b, kv=kv: asked.append(b - a) or kv(a, b))
    stats = store.stats()
    assert (stats["nodes"], stats["tokens_held"], sum(asked)) == (nodes, held, given)
    assert stats["bytes_held"] == hf_kvplus.cache_nbytes(store) == given * NODE_BYTES_PER_TOKEN


def test_windows_are_views_of_the_inserted_tensors():
    store = PrefixPool(block_size=BLOCK)
    given = kv_for([1, 2, 3, 4, 5, 6])(0, 6)
    store.insert([1, 2, 3, 4, 5, 6], lambda a, b: given)
    store.insert([1, 2, 3, 4, 7, 8], kv_for([1, 2, 3, 4, 7, 8]))  # splits the first node
    found = store.match([1, 2, 3, 4, 5, 6])
    for layer, (keys, values) in enumerate(given):
        for payload, _, _ in found.segments:
            held_keys, held_values = payload[layer].get()
            assert held_keys.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()
            assert held_values.untyped_storage().data_ptr() == values.untyped_storage().data_ptr()


EVICT_CASES = [
    # (budget in tokens, sequences inserted, sequences matched (touched) between, sequences acquired,
    #  the insert that needs room, sequences still cached afterwards)
    (6, [[1, 2], [3, 4], [5, 6]], [], [], [7, 8], [[3, 4], [5, 6], [7, 8]]),  # least recently used goes
    (6, [[1, 2], [3, 4], [5, 6]], [[1, 2]], [], [7, 8], [[1, 2], [5, 6], [7, 8]]),  # touched: kept
    (6, [[1, 2], [3, 4], [5, 6]], [], [[1, 2]], [7, 8], [[1, 2], [5, 6], [7, 8]]),  # referenced: never evicted
    (6, [[1, 2], [3, 4], [5, 6]], [], [[1, 2], [3, 4], [5, 6]], [7, 8], [[1, 2], [3, 4], [5, 6]]),  # refused
    (4, [[1, 2, 3, 4]], [], [], [5, 6], [[5, 6]]),  # a whole leaf goes
    (6, [[1, 2, 3, 4], [5, 6]], [], [], [1, 2, 3, 4, 7, 8, 9, 10], [[1, 2, 3, 4]]),  # too big: refused, nothing lost
]


@pytest.mark.parametrize(("budget", "inserted", "touched", "acquired", "new", "cached"), EVICT_CASES)
def test_evict(budget, inserted, touched, acquired, new, cached):
    store = PrefixPool(max_bytes=budget * NODE_BYTES_PER_TOKEN, block_size=BLOCK)
    for tokens in inserted:
        insert(store, tokens)
    for tokens in touched:
        store.match(tokens)
    for tokens in acquired:
        store.acquire(tokens)
    insert(store, new)
    for tokens in cached:
        assert store.match(tokens).length == len(tokens), f"{tokens} was evicted"
    stats = store.stats()
    assert stats["tokens_held"] == sum(len(t) for t in cached)
    assert stats["bytes_held"] == hf_kvplus.cache_nbytes(store) <= store.max_bytes


def test_split_halves_share_storage_so_evicting_one_frees_nothing():
    store = PrefixPool(block_size=BLOCK)
    insert(store, [1, 2, 3, 4])
    insert(store, [1, 2, 5, 6])  # head [1, 2] and tail [3, 4] share the first insert's tensors
    before = store.nbytes
    tail = next(n for n in store._tree.nodes.values() if n.tokens == (3, 4))
    store._tree.evict(tail)
    assert store.nbytes == before == hf_kvplus.cache_nbytes(store)
    store.clear()
    assert store.nbytes == 0 and store.stats()["nodes"] == 0


def test_references_follow_the_path_and_releases_are_applied_by_the_next_call():
    store = PrefixPool(block_size=BLOCK)
    insert(store, [1, 2, 3, 4, 5, 6])
    found = store.acquire([1, 2, 3, 4, 5, 6])
    insert(store, [1, 2, 3, 4, 7, 8])  # split while referenced: the new head inherits the count
    assert store.stats()["referenced_nodes"] == 2
    store.clear()
    assert store.match([1, 2, 3, 4, 5, 6]).length == 6
    store.release(found.node_id)
    assert store.stats()["referenced_nodes"] == 0
    store.release(found.node_id)  # a bug in the caller: detected, not ignored
    with pytest.raises(RuntimeError, match="released more often"):
        store.stats()
    store.clear()
    assert store.stats()["nodes"] == 0


class NewestFirst:
    def choose(self, candidates):
        return max(candidates, key=lambda node: node.last_used)


def test_eviction_policy_is_pluggable():
    store = PrefixPool(max_bytes=4 * NODE_BYTES_PER_TOKEN, block_size=BLOCK, policy=NewestFirst())
    for tokens in ([1, 2], [3, 4], [5, 6]):
        insert(store, tokens)
    assert [store.match(t).length for t in ([1, 2], [3, 4], [5, 6])] == [2, 0, 2]


def test_hits_misses_and_tokens_reused():
    store = PrefixPool(block_size=BLOCK)
    insert(store, [1, 2, 3, 4])
    store.acquire([1, 2, 3, 9], rows=3)
    store.acquire([7, 7, 7, 7])
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["tokens_reused"], stats["referenced_nodes"]) == (3, 1, 6, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(max_bytes=0), ValueError, "max_bytes must be an integer >= 1 or None"),
        (dict(max_bytes=1.5), ValueError, "max_bytes must be"),
        (dict(block_size=0), ValueError, "block_size must be an integer >= 1"),
        (dict(policy=object()), TypeError, "choose"),
        (dict(nbits=3), ValueError, "nbits"),
        (dict(nbits=4, block_size=16, group_size=12), ValueError, "group_size must be a positive divisor of block_size=16, got 12"),
        (dict(group_size=16), ValueError, "group_size=16 only applies to packed storage"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        PrefixPool(**kwargs)


def test_bad_kv_is_refused():
    store = PrefixPool(block_size=BLOCK)
    with pytest.raises(ValueError, match=r"\[1, kv_heads, 2, head_dim\]"):
        store.insert([1, 2], lambda a, b: [(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))])
    insert(store, [1, 2])
    with pytest.raises(ValueError, match="one store per model"):
        store.insert([3, 4], lambda a, b: [(torch.zeros(1, 5, 2, 2), torch.zeros(1, 5, 2, 2))] * LAYERS)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("iam"), st.lists(st.integers(1, 3), min_size=0, max_size=9)), max_size=25))
def test_random_operations_keep_every_invariant(operations):
    """Inserts, acquires and releases in any order: matches read the right tokens, budget and bytes hold."""
    store = PrefixPool(max_bytes=10 * NODE_BYTES_PER_TOKEN, block_size=BLOCK)
    held = []
    for op, tokens in operations:
        if op == "i":
            insert(store, tokens)
        elif op == "a":
            held.append(store.acquire(tokens).node_id)
        elif held:
            store.release(held.pop(0))
        found = store.match(tokens)
        assert window_tokens(found, layer=LAYERS - 1) == (tokens[: found.length], list(range(found.length)))
        assert store.nbytes == hf_kvplus.cache_nbytes(store) <= store.max_bytes
    for node_id in held:
        store.release(node_id)
    assert store.stats()["referenced_nodes"] == 0
