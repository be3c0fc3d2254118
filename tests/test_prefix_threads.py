"""Concurrent requests sharing one PrefixStore: the budget and the reference counts stay consistent."""

from __future__ import annotations

import gc
import threading

import torch
from conftest import prompt, tiny_model

import hf_kvplus
from hf_kvplus import PrefixStore

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
                results[i] = model.generate(jobs[i], max_new_tokens=NEW, do_sample=False, past_key_values=cache)
        except Exception as error:  # reported below: a thread's exception would otherwise be lost
            errors.append(error)

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    watcher.start()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    done.set()
    watcher.join()
    assert not errors and not over_budget
    assert all(torch.equal(got, want) for got, want in zip(results, expected, strict=True))
    gc.collect()
    stats = store.stats()
    assert stats["referenced_nodes"] == 0  # every request gave its references back
    assert stats["hits"] > 0 and stats["evicted_nodes"] + stats["rejected_inserts"] > 0
    assert stats["bytes_held"] == hf_kvplus.cache_nbytes(store) <= store.max_bytes
    assert sum(node.refs for node in store._tree.nodes.values()) == 0
