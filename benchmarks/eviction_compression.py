"""Context compression, side by side: prefill 2048 tokens, keep a share of them, score the next 256.

The kvpress protocol (``hf_kvplus.eval.compression_perplexity``): for each of 3 consecutive windows
of the embedded text, the context is prefilled through a fresh cache in one forward (the cache then
evicts down to ``keep * 2048`` tokens), and the next 256 tokens are scored teacher-forced against
what was kept. ``ppl`` is the mean of the window perplexities (dense: about 10.8).

Run (about 15 minutes on 2 CPU cores)::

    PYTHONPATH=. python benchmarks/eviction_compression.py
    PYTHONPATH=. python benchmarks/eviction_compression.py --strategies h2o sink --keep 0.5   # a subset

Writes ``benchmarks/results/eviction_compression.{json,md}`` (rows of earlier runs are kept unless
recomputed).
"""

from __future__ import annotations

import argparse
import time

from eviction_common import STRATEGIES, build, load, load_rows, save, unavailable

from hf_kvplus.eval import compression_perplexity

STEM = "eviction_compression"
CONTEXT, TARGET, WINDOWS = 2048, 256, 3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model, ids = load(args.threads)
    path = f"results/{STEM}.json"
    rows = load_rows(__import__("eviction_common").RESULTS / f"{STEM}.json")
    for label in args.strategies:
        reason = unavailable(model, label)
        ratios = [1.0] if label == "dense" else args.keep
        for keep in ratios:
            key = f"{label}@{keep}"
            budget = round(keep * CONTEXT)
            row = {"key": key, "strategy": label, "keep": keep, "budget": budget}
            if reason:
                row["note"] = f"not run: {reason}"
            else:
                began = time.perf_counter()
                result = compression_perplexity(
                    model, lambda: build(model, label, budget), ids, CONTEXT, TARGET, WINDOWS
                )
                row.update(
                    ppl=result["ppl"],
                    window_ppl=result["window_ppl"],
                    cache_mib=result["cache_bytes"] / 2**20,
                    seconds=time.perf_counter() - began,
                )
            rows[key] = row
            print(f"{key:>16}  ppl {row.get('ppl', float('nan')):.3f}  {row.get('note', '')}", flush=True)
            _write(rows, path)
    print(_write(rows, path))


def _write(rows: dict, path: str) -> str:
    dense = rows.get("dense@1.0", {}).get("ppl")
    ordered = sorted(rows.values(), key=lambda r: (-r["keep"], list(STRATEGIES).index(r["strategy"])))
    for row in ordered:
        if dense and "ppl" in row:
            row["vs_dense"] = f"{100 * (row['ppl'] / dense - 1):+.1f}%"
    meta = {
        "protocol": f"prefill {CONTEXT}, score next {TARGET} teacher-forced, {WINDOWS} consecutive windows, "
        "one-shot prefill then eviction",
        "command": "PYTHONPATH=. python benchmarks/eviction_compression.py",  # rows resume; the default runs all
        "model": "SmolLM2-135M-Instruct (embedded GGUF), float32, CPU",
    }
    columns = ["strategy", "keep", "budget", "ppl", "vs_dense", "cache_mib", "note"]
    return save(STEM, ordered, columns, meta, "Context compression: perplexity vs share of context kept")


if __name__ == "__main__":
    main()
