"""Concurrent requests sharing one PrefixStore: the budget and the reference counts stay consistent."""

from __future__ import annotations

import gc
import sys
import threading

import torch
from conftest import prompt, tiny_model

import hf_kvplus
from hf_kvplus import PrefixStore
from hf_kvplus._compat import cache_kwargs

THREADS, REQUESTS, NEW = 3, 12, 4
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny llama: layers x (k, v) x kv heads x head_dim x fp32


@torch.no_grad()
def test_concurrent_requests_keep_the_budget_and_reference_counts_consistent():
    model = hf_kvplus.attach(tiny_model("llama-gqa"))
    prefixes = [prompt(length=16, seed=s) for s in range(3)]
    jobs = [torch.cat([prefixes[i % 3], prompt(length=5, seed=100 + i)], dim=1) for i in range(REQUESTS)]
    expected = [model.generate(ids, max_new_tokens=NEW, do_sample=False) for ids in jobs]
    # Tight: three prefixes and their requests need more, so threads evict and get refused all along.
    store = PrefixStore(block_size=4, max_bytes=56 * BYTES_PER_TOKEN)
    results, errors, over_budget = [None] * REQUESTS, [], []
    done = threading.Event()

    def watch():
        while not done.wait(0.002):
            stats = store.stats()
            if stats["bytes_held"] > stats["max_bytes"]:
                over_budget.append(stats)

    def work(first: int):
        try:
            for i in range(first, REQUESTS, THREADS):
                cache = store.cache_for(model, jobs[i])
                results[i] = model.generate(jobs[i], max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache))
        except Exception as error:  # reported below: a thread's exception would otherwise be lost
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads very often, so an unlocked critical section would interleave
    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    watcher.start()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    done.set()
    watcher.join()
    sys.setswitchinterval(interval)
    assert not errors and not over_budget
    assert all(torch.equal(got, want) for got, want in zip(results, expected, strict=True))
    gc.collect()
    stats = store.stats()
    assert stats["referenced_nodes"] == 0  # every request gave its references back
    assert stats["hits"] > 0 and stats["evicted_nodes"] + stats["rejected_inserts"] > 0
    assert stats["bytes_held"] == hf_kvplus.cache_nbytes(store) <= store.max_bytes
    assert sum(node.refs for node in store._tree.nodes.values()) == 0


def test_hammering_the_store_from_threads_keeps_the_tree_consistent():
    """Model-free, many short operations per thread: references, structure and bytes stay exact."""
    store = PrefixStore(block_size=2, max_bytes=12 * 64)  # 12 of the 22 blocks: evictions all along
    sequences = [[a, b, c, d, e, f] for a in (1, 2) for b in (3, 4) for c in (5, 6) for d, e, f in [(7, 8, 9), (9, 8, 7)]]

    def kv(start, stop):
        return [(torch.zeros(1, 2, stop - start, 2), torch.zeros(1, 2, stop - start, 2))]

    errors = []

    def work(seed: int):
        generator = torch.Generator().manual_seed(seed)
        try:
            for _ in range(2000):
                tokens = sequences[int(torch.randint(len(sequences), (1,), generator=generator))]
                found = store.acquire(tokens[: int(torch.randint(7, (1,), generator=generator))])
                inserted = store.insert(tokens, kv, acquire=True)
                store.release(found.node_id)
                store.release(inserted.node_id)
        except Exception as error:
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    tree = store._tree
    store.stats()  # applies the queued releases
    reachable, stack = [], list(tree.root.children.values())
    while stack:
        node = stack.pop()
        reachable.append(node)
        assert all(child.parent is node for child in node.children.values())
        stack.extend(node.children.values())
    assert sorted(n.id for n in reachable) == sorted(tree.nodes)
    assert [n.refs for n in reachable if n.refs] == [], "references leaked or were lost"
    assert store.nbytes == hf_kvplus.cache_nbytes(store) <= store.max_bytes
