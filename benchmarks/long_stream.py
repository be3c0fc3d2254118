"""Stream a long text through the sink cache: memory stays flat, perplexity stays stable.

Feeds ``--tokens`` tokens of the default text (113k tokens in all) through the embedded model with
``SinkCache`` at ``--budget`` tokens per layer, and prints, for every ``--report-every`` tokens, the
perplexity of that stretch, the cache bytes and the process RSS. With ``--compare-no-rerotation``
the same stream also runs without key re-rotation: past the model's 8k trained context the distance
between queries and the sink keys exceeds anything seen in training.

``--chunk-size 1`` is the exact protocol (about 40 ms per token here, so 100k tokens take over an
hour); larger chunks are an approximation that the output states.

    PYTHONPATH=. python benchmarks/long_stream.py --tokens 100000 --chunk-size 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hf_kvplus
from hf_kvplus.eval import load_default_model, load_default_text, load_default_tokenizer, streaming_perplexity
from hf_kvplus.eval.report import markdown_table

MIB = 2**20


def run(model, ids, label: str, tokens: int, budget: int, chunk_size: int, report_every: int, rerotate: bool):
    cache = hf_kvplus.make_cache("sink", model, budget=budget, rerotate_keys=rerotate)
    result = streaming_perplexity(
        model, cache, ids, num_tokens=tokens, chunk_size=chunk_size, report_every=report_every, progress=True
    )
    rows = []
    for i, ppl in enumerate(result["window_ppl"]):
        rows.append(
            {"strategy": label, "tokens": min((i + 1) * report_every, tokens - 1), "ppl": ppl,
             "cache_mib": result["window_cache_bytes"][i] / MIB, "rss_mib": result["window_rss_bytes"][i] / MIB}
        )
    return rows, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--report-every", type=int, default=8192)
    parser.add_argument("--compare-no-rerotation", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/long_stream.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = load_default_model()
    ids = load_default_tokenizer()(load_default_text(), return_tensors="pt").input_ids[0]
    if args.tokens > ids.numel():
        parser.error(f"--tokens must be at most {ids.numel()} (the default text's length), got {args.tokens}")
    runs = [("sink, re-rotated keys", True)]
    if args.compare_no_rerotation:
        runs.append(("sink, original positions", False))
    rows, summary = [], []
    began = time.perf_counter()
    for label, rerotate in runs:
        table, result = run(model, ids, label, args.tokens, args.budget, args.chunk_size, args.report_every, rerotate)
        rows += table
        ppls = result["window_ppl"]
        held = result["window_cache_bytes"]
        summary.append(
            {"strategy": label, "tokens_scored": result["tokens_scored"], "chunk_size": args.chunk_size,
             "exact": result["exact"], "ppl": result["ppl"], "worst_window_ppl": max(ppls),
             "cache_mib_first": held[0] / MIB, "cache_mib_last": held[-1] / MIB,
             "rss_mib_first": result["window_rss_bytes"][0] / MIB, "rss_mib_last": result["window_rss_bytes"][-1] / MIB,
             "tok_s": result["tokens_per_second"]}
        )
    trained = model.config.max_position_embeddings
    print(f"\n{args.tokens} tokens of the default text ({args.tokens / trained:.1f}x the model's {trained} trained "
          f"positions), budget {args.budget} tokens per layer, chunk size {args.chunk_size} "
          f"({'exact' if args.chunk_size == 1 else 'approximation: chunked'})\n")
    print(markdown_table(rows))
    print(markdown_table(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "max_position_embeddings": trained, "rows": rows, "summary": summary,
                               "seconds": time.perf_counter() - began}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(summary) + "\n" + markdown_table(rows))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
