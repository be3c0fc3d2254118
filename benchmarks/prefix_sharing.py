"""Prefix sharing: 16 requests with one 1,024-token prefix, against DynamicCache and deepcopy reuse.

Every request is the same 1,024-token prefix (the start of the default text, a stand-in for a long
system prompt) plus its own 32-token suffix, then 16 greedy tokens. Three ways, side by side in one
process on the embedded model (SmolLM2-135M, fp32, CPU):

* ``dynamic``: a fresh ``DynamicCache`` per request, which prefills all 1,056 tokens;
* ``deepcopy``: the way the transformers docs reuse a prompt: prefill the prefix once into a
  ``DynamicCache``, then ``copy.deepcopy`` it for each request, which prefills its 32 tokens;
* ``prefix``: one ``hf_kvplus.PrefixStore``; the first request fills it (a miss), the 15 others get
  ``store.cache_for(model, ids)`` (hits), which prefills 32 tokens and reads the prefix in place.

The 16 requests' caches are kept alive together, as concurrent requests would be, and measured with
``hf_kvplus.cache_nbytes`` (storage shared by several caches counted once; for ``prefix`` the store is
counted too). Time to first token runs from building the cache (copy or lookup included) to the first
logits; the headline ratio times cold prefills and hits alternately, on suffixes no request used, so
both see the same machine load. Decode time per token is the median over requests of the rest of
``generate``, and one decode step is also timed alternately for both caches at the same context.
"prefix storages" counts distinct storages holding the prefix's keys of layer 0. One torch thread by
default: on a shared 2-core machine, two threads can run ten times slower than one.

    PYTHONPATH=. python benchmarks/prefix_sharing.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.eval import load_default_model, load_default_text, load_default_tokenizer
from hf_kvplus.eval.report import markdown_table, write_json
from hf_kvplus.memory import kv_bytes_per_token

MIB = 2**20
COMMAND = "PYTHONPATH=. python benchmarks/prefix_sharing.py"


class FirstToken(LogitsProcessor):
    """Records when generate produced its first logits (logits processors run right after each forward)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        self.at = self.at or time.perf_counter()
        return scores


class Counter:
    """Tokens fed to the model per forward (a forward pre-hook on the model)."""

    def __init__(self, model):
        self.lengths = []
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        self.lengths.append(ids.shape[1])

    def prefill_tokens(self) -> int:
        return sum(n for n in self.lengths if n > 1)


@torch.no_grad()
def interleaved_decode(model, caches: dict, steps: int = 20) -> dict:
    """Median ms of one decode step for each cache, alternating between them (the same machine load)."""
    times = {name: [] for name in caches}
    token = torch.tensor([[model.config.eos_token_id or 0]])
    for _ in range(steps):
        for name, cache in caches.items():
            began = time.perf_counter()
            model(token, **cache_kwargs(cache), use_cache=True)
            times[name].append(1000 * (time.perf_counter() - began))
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def interleaved_ttft(model, store, fresh) -> dict:
    """Median time to first token of a cold full prompt and of a store hit, alternating on unseen requests."""
    times = {"cold": [], "hit": []}
    for ids in fresh:
        for name, make in (("cold", lambda: DynamicCache(config=model.config)), ("hit", lambda ids=ids: store.cache_for(model, ids))):
            probe, began = FirstToken(), time.perf_counter()
            model.generate(ids, **cache_kwargs(make()), max_new_tokens=1, do_sample=False,
                           logits_processor=LogitsProcessorList([probe]))
            times[name].append(probe.at - began)
    return {name: statistics.median(values) for name, values in times.items()}


def layer0_storage(cache) -> int:
    layer = cache.layers[0]
    if isinstance(layer, hf_kvplus.prefix.PrefixLayer):
        payload, _, _ = layer.store.segments[0]
        return payload[0].get()[0].untyped_storage().data_ptr()
    return layer.keys.untyped_storage().data_ptr()


@torch.no_grad()
def serve(model, requests, new_tokens, make_cache):
    """Run every request; returns (caches, outputs, ttft seconds, decode seconds per token)."""
    caches, outputs, ttft, decode = [], [], [], []
    for ids in requests:
        probe = FirstToken()
        began = time.perf_counter()
        cache = make_cache(ids)
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([probe]))
        ttft.append(probe.at - began)
        decode.append((time.perf_counter() - probe.at) / (new_tokens - 1))
        caches.append(cache)
        outputs.append(out[0, ids.shape[1]:])
    return caches, outputs, ttft, decode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--suffix", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--interleaved", type=int, default=5, help="unseen requests timed cold vs hit, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    parser.add_argument("--out", default="benchmarks/results/prefix_sharing")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_default_model()
    counter = Counter(model)
    text = load_default_tokenizer()(load_default_text(), return_tensors="pt").input_ids
    prefix = text[:, : args.prefix]
    start = args.prefix + 1000  # suffixes from further on: 16 different "questions"
    requests = [torch.cat([prefix, text[:, start + i * args.suffix : start + (i + 1) * args.suffix]], dim=1)
                for i in range(args.requests)]
    config = model.config
    per_token = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 4)
    ideal = (args.prefix + args.requests * (args.suffix + args.new_tokens - 1)) * per_token
    rows, runs = [], {}

    def record(name, caches, outputs, ttft, decode, held, prefill, storages, hits):
        runs[name] = outputs
        cold = runs.get("dynamic", outputs)
        rows.append({
            "method": name, "kv_mib_held": held / MIB, "vs_one_prefix_plus_suffixes": held / ideal,
            "prefill_tokens": prefill, "ttft_s_hit": statistics.median([ttft[i] for i in hits]),
            "ttft_s_first": ttft[0], "decode_ms_per_token": 1000 * statistics.median(decode), "prefix_storages": storages,
            "outputs_equal_dynamic": sum(torch.equal(a, b) for a, b in zip(outputs, cold, strict=True)),
        })
        print(markdown_table(rows[-1:]), flush=True)

    # 1. A fresh DynamicCache per request: every request is cold.
    counter.lengths.clear()
    caches, outputs, ttft, decode = serve(model, requests, args.new_tokens, lambda ids: DynamicCache(config=config))
    record("dynamic", caches, outputs, ttft, decode, hf_kvplus.cache_nbytes(*caches), counter.prefill_tokens(),
           len({layer0_storage(c) for c in caches}), range(len(caches)))
    del caches

    # 2. transformers' documented reuse: prefill the prefix once, deepcopy it per request.
    counter.lengths.clear()
    with torch.no_grad():
        shared = DynamicCache(config=config)
        model(prefix, **cache_kwargs(shared), use_cache=True)
    caches, outputs, ttft, decode = serve(model, requests, args.new_tokens, lambda ids: copy.deepcopy(shared))
    record("deepcopy", caches, outputs, ttft, decode, hf_kvplus.cache_nbytes(shared, *caches), counter.prefill_tokens(),
           len({layer0_storage(c) for c in [shared, *caches]}), range(len(caches)))
    del caches
    shared = None

    # 3. hf_kvplus.PrefixStore: the first request is a miss that fills the store, the others hit.
    counter.lengths.clear()
    store = hf_kvplus.PrefixStore(max_bytes=2**30)
    caches, outputs, ttft, decode = serve(model, requests, args.new_tokens, lambda ids: store.cache_for(model, ids))
    record("prefix", caches, outputs, ttft, decode, hf_kvplus.cache_nbytes(store, *caches), counter.prefill_tokens(),
           len({layer0_storage(c) for c in caches}), range(1, len(caches)))
    stats = store.stats()
    with torch.no_grad():  # the same context (request 2, 1,071 tokens) in a DynamicCache and in its prefix cache
        dense = DynamicCache(config=config)
        model(torch.cat([requests[1], outputs[1][None, :-1]], dim=1), **cache_kwargs(dense), use_cache=True)
    step_ms = interleaved_decode(model, {"dynamic": dense, "prefix": caches[1]})
    fresh = [torch.cat([prefix, text[:, start - (i + 1) * args.suffix : start - i * args.suffix]], dim=1)
             for i in range(args.interleaved)]  # suffixes no request used
    ttft = interleaved_ttft(model, store, fresh)

    table = markdown_table(rows)
    prefix_row = rows[-1]
    speedup = ttft["cold"] / ttft["hit"]
    targets = {
        "bytes_vs_ideal": prefix_row["vs_one_prefix_plus_suffixes"], "bytes_target": 1.1,
        "prefix_storages": prefix_row["prefix_storages"], "ttft_speedup_vs_cold": speedup, "ttft_target": 10.0,
        "identical_outputs": prefix_row["outputs_equal_dynamic"] == args.requests
        and rows[1]["outputs_equal_dynamic"] == args.requests,
    }
    summary = (f"Time to first token on a hit: {speedup:.1f}x faster than a cold prefill of the full prompt "
               f"(target 10x; {ttft['hit']:.3f} s vs {ttft['cold']:.3f} s, medians of {args.interleaved} unseen "
               f"suffixes, alternating). KV held: {prefix_row['vs_one_prefix_plus_suffixes']:.3f}x one prefix + "
               f"{args.requests} suffixes (target 1.1x). Prefix held in {prefix_row['prefix_storages']} storage(s). "
               f"Greedy outputs identical to dynamic: {prefix_row['outputs_equal_dynamic']}/{args.requests}. "
               f"One decode step at the same context, alternating: dynamic {step_ms['dynamic']:.1f} ms, "
               f"prefix {step_ms['prefix']:.1f} ms.")
    print(table)
    print(summary)
    setup = (f"{args.requests} requests = one {args.prefix}-token prefix + a different {args.suffix}-token suffix, "
             f"then {args.new_tokens} greedy tokens; SmolLM2-135M-Instruct, fp32, CPU "
             f"({torch.get_num_threads()} threads), torch {torch.__version__}, transformers {transformers.__version__}.")
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"command": COMMAND, "setup": setup, "rows": rows, "targets": targets,
                                          "decode_step_ms_interleaved": step_ms, "ttft_s_interleaved": ttft, "ideal_bytes": ideal, "bytes_per_token": per_token, "store_stats": stats})
    out.with_suffix(".md").write_text(f"{setup}\n\n{table}\n{summary}\n\nProduced by `{COMMAND}`.\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
