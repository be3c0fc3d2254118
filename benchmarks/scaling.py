"""How cache memory and decode step time grow with context length, per strategy.

For context lengths 1k, 2k, 4k, 8k (and 16k, 32k for the strategies that stay at a constant budget),
each cache is fed the embedded text in chunks of 512 tokens (``hf_kvplus.prefill``), one cache per
strategy growing from one length to the next; at each length we record ``cache_nbytes`` and time
single-token greedy decode steps. Decode steps of all strategies are interleaved in rounds, so load
from other processes affects every row alike; the step time is the median. Ratios are against the
dense ``DynamicCache`` at the same length (8k at most: the model's trained context is 8,192 tokens).

``sink`` re-rotates its keys to cache-slot positions, so it streams past the trained context;
``h2o`` and ``h2o+int4`` keep original positions (their perplexity past 8k is not what this
measures: bytes and time are).

Run from the repository root (about 10 minutes on 2 CPU cores)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/scaling.py
    PYTHONPATH=. python benchmarks/scaling.py --lengths 1024 2048 --strategies dense sink   # a subset
    PYTHONPATH=. python benchmarks/scaling.py --render      # re-plot from the saved JSON

Writes ``benchmarks/results/scaling.{json,md}`` and ``docs/images/scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import hf_kvplus
from hf_kvplus._compat import cache_kwargs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "images" / "scaling.png"
STEM = "scaling"
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
# label -> (registered name or "dynamic", keyword arguments, whether memory stays at the budget)
STRATEGIES: dict[str, tuple[str, dict, bool]] = {
    "dense": ("dynamic", {}, False),
    "int4": ("int4", {}, False),
    "sink": ("sink", {}, True),
    "h2o": ("h2o", {}, True),
    "h2o+int4": ("h2o", {"nbits": 4}, True),
}


def build(model, label: str, budget: int):
    """A fresh cache for ``label`` (``budget`` only applies to the constant-budget strategies)."""
    if label not in STRATEGIES:
        raise ValueError(f"unknown strategy {label!r}; choose from {list(STRATEGIES)}")
    name, kwargs, bounded = STRATEGIES[label]
    if name == "dynamic":
        return transformers.DynamicCache(config=model.config)
    return hf_kvplus.make_cache(name, model, **({"budget": budget} if bounded else {}), **kwargs)


def lengths_for(label: str, lengths, max_growing: int) -> list[int]:
    """The lengths ``label`` is measured at: growing caches stop at ``max_growing`` tokens."""
    return [n for n in lengths if STRATEGIES[label][2] or n <= max_growing]


@torch.no_grad()
def measure(model, ids: torch.Tensor, strategies, lengths, budget: int = 1024, max_growing: int = 8192,
            chunk_size: int = 512, steps: int = 8, rounds: int = 3) -> list[dict]:
    """Rows ``{strategy, context, cache_bytes, step_ms}`` for every strategy at each of its lengths."""
    lengths = sorted(lengths)
    if lengths[-1] > ids.numel():
        raise ValueError(f"the longest length {lengths[-1]} exceeds the text ({ids.numel()} tokens)")
    states = {label: {"cache": build(model, label, budget), "fed": 0} for label in strategies}
    rows = []
    for length in lengths:
        active = [label for label in strategies if length in lengths_for(label, lengths, max_growing)]
        for label in active:  # feed the text up to `length` (decoded tokens come on top, as in a chat)
            state = states[label]
            logits = hf_kvplus.prefill(model, ids[None, state["fed"]:length], state["cache"], chunk_size).logits
            state["fed"], state["token"] = length, logits[:, -1:].argmax(-1)  # [1, 1]
            state["bytes"], state["times"] = hf_kvplus.cache_nbytes(state["cache"]), []
        for _ in range(rounds):  # interleaved: load from other processes affects every row alike
            for label in active:
                state = states[label]
                for _ in range(steps):
                    began = time.perf_counter()
                    logits = model(state["token"], **cache_kwargs(state["cache"]), use_cache=True).logits
                    state["token"] = logits[:, -1:].argmax(-1)
                    state["times"].append(time.perf_counter() - began)
        for label in active:
            rows.append({"key": f"{label}@{length}", "strategy": label, "context": length,
                         "cache_bytes": states[label]["bytes"],
                         "step_ms": 1000 * statistics.median(states[label]["times"])})
            if length == lengths_for(label, lengths, max_growing)[-1]:
                states[label]["cache"] = None  # done with it: free the memory
    return ratios(rows)


def ratios(rows: list[dict]) -> list[dict]:
    """Add ``bytes_vs_dense`` and ``step_vs_dense`` (dense at the same length) where dense was measured."""
    dense = {row["context"]: row for row in rows if row["strategy"] == "dense"}
    for row in rows:
        base = dense.get(row["context"])
        if base:
            row["bytes_vs_dense"] = row["cache_bytes"] / base["cache_bytes"]
            row["step_vs_dense"] = row["step_ms"] / base["step_ms"]
    return rows


def plot(rows: list[dict], path: Path = PLOT) -> Path:
    """Cache MiB and decode step time against context length, both axes logarithmic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(row["strategy"] for row in rows):
        mine = sorted((r for r in rows if r["strategy"] == label), key=lambda r: r["context"])
        x = [r["context"] for r in mine]
        left.plot(x, [r["cache_bytes"] / 2**20 for r in mine], marker="o", label=label)
        right.plot(x, [r["step_ms"] for r in mine], marker="o", label=label)
    for axis, title in ((left, "cache after prefill (MiB)"), (right, "decode step (ms, median)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    right.axvline(8192, color="grey", linestyle=":", label="trained context")
    left.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


COLUMNS = ["strategy", "context", "cache_mib", "bytes_vs_dense", "step_ms", "step_vs_dense"]


def render(report: dict) -> str:
    from hf_kvplus.eval.report import markdown_table

    rows = [{**row, "cache_mib": f"{row['cache_bytes'] / 2**20:.1f}", "step_ms": f"{row['step_ms']:.1f}",
             **{k: f"{row[k]:.3f}" for k in ("bytes_vs_dense", "step_vs_dense") if k in row}}
            for row in sorted(report["rows"], key=lambda r: (r["context"], list(STRATEGIES).index(r["strategy"])))]
    return markdown_table(rows, COLUMNS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument("--max-growing", type=int, default=8192, help="longest context for caches that grow")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per strategy per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="only re-render table and plot from the saved JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    path = args.out / f"{STEM}.json"
    if args.render:
        report = json.loads(path.read_text())
    else:
        torch.set_num_threads(args.threads)
        from hf_kvplus.eval import load_default_model, load_default_text, load_default_tokenizer
        from hf_kvplus.eval.report import write_json

        model = load_default_model()
        ids = load_default_tokenizer()(load_default_text(), return_tensors="pt").input_ids[0]
        rows = measure(model, ids, args.strategies, args.lengths, args.budget, args.max_growing,
                       steps=args.steps, rounds=args.rounds)
        report = {"meta": {
            "protocol": f"text fed in chunks of 512; budget {args.budget} for sink/h2o/h2o+int4; {args.steps} greedy "
            f"steps x {args.rounds} interleaved rounds per length; median step time",
            "command": "PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/scaling.py",
            "model": "SmolLM2-135M-Instruct (embedded GGUF), float32, CPU",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}, "rows": rows}
        write_json(path, report)
    table = render(report)
    (args.out / f"{STEM}.md").write_text(f"# Cache bytes and decode step time vs context length\n\n{table}\n"
                                         f"Command: `{report['meta']['command']}`\n")
    if args.out == RESULTS:
        plot(report["rows"])
    print(table)


if __name__ == "__main__":
    main()
