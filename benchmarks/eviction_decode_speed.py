"""Decode step time at a long context: an evicting cache at budget 512 vs dense caches of 512 and 8k tokens.

Each evicting cache prefills an 8,000-token prompt in chunks of 512 (``hf_kvplus.prefill``), so it
never holds more than its budget, then decodes greedily; the median step time is compared with
``DynamicCache`` after a 512-token prompt (the same number of keys per step, no eviction) and after
the full 8,000-token prompt (what eviction saves). All caches are prefilled first, then decoded in
interleaved rounds in one process, so that load from other processes affects every row alike.

Run (about 10 minutes on 2 CPU cores)::

    PYTHONPATH=. python benchmarks/eviction_decode_speed.py
    PYTHONPATH=. python benchmarks/eviction_decode_speed.py --strategies h2o --steps 16 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from eviction_common import STRATEGIES, build, load, save, unavailable

import hf_kvplus
from hf_kvplus._compat import cache_kwargs

STEM = "eviction_decode_speed"


@torch.no_grad()
def decode_steps(model, state: dict, steps: int) -> list[float]:
    """Time ``steps`` greedy decode steps on ``state`` (``cache`` and next ``token``, updated in place)."""
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        logits = model(state["token"], **cache_kwargs(state["cache"]), use_cache=True).logits
        state["token"] = logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - began)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    evicting = [label for label in STRATEGIES if label != "dense"]
    parser.add_argument("--strategies", nargs="+", default=evicting, choices=evicting)
    parser.add_argument("--context", type=int, default=8000)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model, ids = load(args.threads)
    long_prompt, short_prompt = ids[: args.context], ids[args.context - args.budget : args.context]
    runs = {f"dense@{args.budget}": ("dense", short_prompt), f"dense@{args.context}": ("dense", long_prompt)}
    notes = {}
    for label in args.strategies:
        reason = unavailable(model, label)
        if reason:
            notes[f"{label}@{args.budget}"] = f"not run: {reason}"
        else:
            runs[f"{label}@{args.budget}"] = (label, long_prompt)
    states = {}
    for key, (label, prompt) in runs.items():  # prefill every cache first, chunk by chunk
        cache = build(model, label, args.budget)
        logits = hf_kvplus.prefill(model, prompt[None], cache, chunk_size=args.budget).logits
        states[key] = {"cache": cache, "token": logits[:, -1:].argmax(-1)}
        print(f"{key:>16}  prefilled {prompt.numel()} tokens", flush=True)
    times = {key: [] for key in runs}
    held = {key: hf_kvplus.cache_nbytes(state["cache"]) for key, state in states.items()}
    for _ in range(args.rounds):  # interleaved, so load from other processes affects every row alike
        for key, state in states.items():
            times[key] += decode_steps(model, state, args.steps)
    for key, samples in times.items():
        print(f"{key:>16}  median step {1000 * statistics.median(samples):.1f} ms", flush=True)
    base_short = statistics.median(times[f"dense@{args.budget}"])
    base_long = statistics.median(times[f"dense@{args.context}"])
    rows = []
    for key, samples in times.items():
        median = statistics.median(samples)
        label, prompt = runs[key]
        rows.append({
            "key": key, "strategy": label, "context": prompt.numel(),
            "step_ms": 1000 * median, "vs_dense_budget": median / base_short, "vs_dense_full": median / base_long,
            "cache_mib": held[key] / 2**20,
        })
    rows += [{"key": key, "strategy": key.split("@")[0], "note": note} for key, note in notes.items()]
    meta = {
        "protocol": f"prompt of {args.context} tokens prefilled in chunks of {args.budget}, then {args.steps} greedy "
        f"steps x {args.rounds} rounds; median step time",
        "command": "PYTHONPATH=. python benchmarks/eviction_decode_speed.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (embedded GGUF), float32, CPU, torch threads=%d" % args.threads,
    }
    columns = ["key", "context", "step_ms", "vs_dense_budget", "vs_dense_full", "cache_mib", "note"]
    print(save(STEM, rows, columns, meta, f"Decode step time at {args.context} tokens of context, budget {args.budget}"))


if __name__ == "__main__":
    main()
