"""Property-based test of the PrefixStore's bookkeeping: random inserts, requests (acquire), releases and
clears keep the byte budget, the reference counts, the tree's structure and ``cache_nbytes``."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_prefix_store import BLOCK, NODE_BYTES_PER_TOKEN, insert, window_tokens

import hf_kvplus
from hf_kvplus import PrefixStore


def check(store: PrefixStore, held: list[int]) -> None:
    """Every invariant of the store, given the node ids of the references ``held`` by live requests."""
    tree = store._tree
    store.stats()  # applies queued releases
    assert all(node_id in tree.nodes for node_id in held), "a referenced node was evicted"
    expected = dict.fromkeys(tree.nodes, 0)
    for node_id in held:  # a reference counts on its node and every ancestor
        node = tree.nodes[node_id]
        while node is not tree.root:
            expected[node.id] += 1
            node = node.parent
    assert {node_id: node.refs for node_id, node in tree.nodes.items()} == expected
    reachable, stack = [], list(tree.root.children.values())
    while stack:
        node = stack.pop()
        reachable.append(node.id)
        assert node.tokens and len(node.tokens) % BLOCK == 0
        assert node.parent.children[node.tokens[:BLOCK]] is node
        stack.extend(node.children.values())
    assert sorted(reachable) == sorted(tree.nodes)
    assert store.nbytes == hf_kvplus.cache_nbytes(store) <= store.max_bytes
    stats = store.stats()
    assert stats["referenced_nodes"] == sum(count > 0 for count in expected.values())
    assert stats["tokens_held"] == sum(len(node.tokens) for node in tree.nodes.values())


tokens = st.lists(st.integers(1, 2), min_size=0, max_size=10)  # few distinct blocks: shared prefixes and splits
operation = st.one_of(
    st.tuples(st.sampled_from(["insert", "acquire", "insert+acquire"]), tokens),
    st.tuples(st.just("release"), st.integers(0, 100)),
    st.tuples(st.just("clear"), st.just(0)),
)


@settings(max_examples=80, deadline=None)
@example(budget_tokens=14, operations=[("insert", [1, 1, 2, 2]), ("acquire", [1, 1, 2, 2]), ("insert", [1, 1, 1, 1])])
@example(budget_tokens=4, operations=[("insert+acquire", [1, 1]), ("insert", [2, 2, 2, 2]), ("insert", [1, 1, 1, 1])])
@given(budget_tokens=st.integers(2, 14), operations=st.lists(operation, max_size=30))
def test_random_requests_keep_budget_references_and_bytes(budget_tokens, operations):
    store = PrefixStore(max_bytes=budget_tokens * NODE_BYTES_PER_TOKEN, block_size=BLOCK)
    held = []
    for op, arg in operations:
        if op == "insert":
            insert(store, arg)
        elif op == "acquire":
            found = store.acquire(arg)
            assert found.length <= len(arg) and found.length % BLOCK == 0
            held.append(found.node_id)
        elif op == "insert+acquire":  # what a request publishing its blocks does
            found = insert(store, arg, acquire=True)
            assert window_tokens(found)[0] == list(arg[: found.length])
            held.append(found.node_id)
        elif op == "release" and held:
            store.release(held.pop(arg % len(held)))  # queued: applied by the next call that takes the lock
        elif op == "clear":
            store.clear()
        check(store, [h for h in held if h is not None])
    for node_id in held:
        store.release(node_id)
    check(store, [])
    store.clear()
    assert store.nbytes == 0 and not store._tree.nodes
