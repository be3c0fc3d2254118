"""Streaming perplexity, side by side: feed the text token by token, let each cache evict, score every token.

The StreamingLLM / H2O protocol (``hf_kvplus.eval.streaming_perplexity`` with ``chunk_size=1``,
which is exact): every strategy sees the same first ``--tokens`` tokens of the embedded text and is
scored on every next token. Tokens before the budget fills are scored identically by all
strategies, so the text is much longer than the largest budget.

Token by token costs about 45 ms per token on 2 CPU cores, so one (strategy, budget) row of 4,096
tokens takes about 3-4 minutes and the full table about an hour. Every row is saved as soon as it is
done; a run skips the rows already in ``benchmarks/results/eviction_streaming.json`` (``--force``
recomputes), so it can be split and resumed::

    PYTHONPATH=. python benchmarks/eviction_streaming.py                          # everything missing
    PYTHONPATH=. python benchmarks/eviction_streaming.py --strategies h2o --budgets 256
    PYTHONPATH=. python benchmarks/eviction_streaming.py --strategies h2o --options '{"decay": 0.99}' --out /tmp/s

``--options`` passes keywords to every strategy of the run (rows labelled ``h2o decay=0.99``); ``--out``
writes the table into another folder (rows already there are resumed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import eviction_common
from eviction_common import STRATEGIES, build, load, load_rows, save, unavailable

from hf_kvplus.eval import streaming_perplexity

STEM = "eviction_streaming"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--budgets", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--force", action="store_true", help="recompute rows already saved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", type=json.loads, default={},
                        help='JSON keywords for every strategy of the run, e.g. \'{"decay": 0.99}\'')
    parser.add_argument("--out", type=Path, default=None, help="folder of the results (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        eviction_common.RESULTS = args.out
    path = eviction_common.RESULTS / f"{STEM}.json"
    rows = load_rows(path)
    model, ids = load(args.threads)
    suffix = "".join(f" {name}={value}" for name, value in sorted(args.options.items()))
    for base in args.strategies:
        label = base + suffix
        reason = unavailable(model, base)
        for budget in [None] if base == "dense" else args.budgets:
            key = f"{label}@{budget or 'all'}@{args.tokens}"
            if key in rows and not args.force and "ppl" in rows[key]:
                continue
            row = {"key": key, "strategy": label, "budget": budget or "all", "tokens": args.tokens}
            if reason:
                row["note"] = f"not run: {reason}"
            else:
                cache = build(model, base, budget, **({} if base == "dense" else args.options))
                result = streaming_perplexity(model, cache, ids, num_tokens=args.tokens)
                row.update(
                    ppl=result["ppl"],
                    cache_bytes=result["cache_bytes"],
                    cache_bytes_peak=result["cache_bytes_peak"],
                    window_ppl=result["window_ppl"],
                    ms_per_token=1000 / result["tokens_per_second"],
                    exact=result["exact"],
                )
            rows[key] = row
            print(f"{key:>24}  ppl {row.get('ppl', float('nan')):.3f}  {row.get('note', '')}", flush=True)
            _write(rows)
    print(_write(rows))


def _write(rows: dict) -> str:
    order = list(STRATEGIES)
    ordered = sorted(
        rows.values(), key=lambda r: (r["tokens"], str(r["budget"]).zfill(6), order.index(r["strategy"].split()[0]),
                                      r["strategy"])
    )
    for row in ordered:
        if "cache_bytes" in row:
            row["cache_mib"] = row["cache_bytes"] / 2**20
    meta = {
        "protocol": "token by token (chunk_size=1, exact): every next token scored, the cache evicting as it goes",
        "command": "PYTHONPATH=. python benchmarks/eviction_streaming.py",  # rows resume; the default runs all
        "model": "SmolLM2-135M-Instruct (embedded GGUF), float32, CPU",
    }
    columns = ["strategy", "budget", "tokens", "ppl", "cache_mib", "ms_per_token", "note"]
    return save(STEM, ordered, columns, meta, "Streaming perplexity at a fixed budget")


if __name__ == "__main__":
    main()
