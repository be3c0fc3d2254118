"""Which H2O settings matter: the context-compression protocol at keep 0.5 for keyword variants of ``h2o``.

Same protocol as ``eviction_compression.py`` (prefill 2048 in one forward, evict to 1024, score the
next 256 teacher-forced, mean of 3 windows). Each row is ``make_cache("h2o", model, budget=1024,
**variant)``; the defaults (``heavy_ratio=0.9, normalize=True``) were chosen from this table.

Run (about 8 minutes on 2 quiet CPU cores; rows are saved one by one, ``--only N`` runs one)::

    PYTHONPATH=. python benchmarks/eviction_h2o_ablation.py
"""

from __future__ import annotations

import argparse
import json
import sys

from eviction_common import RESULTS, load, load_rows, save

import hf_kvplus
from hf_kvplus.eval import compression_perplexity

STEM = "eviction_h2o_ablation"
VARIANTS = [
    {"heavy_ratio": 0.5, "normalize": False},  # the paper: even split, summed mass
    {"heavy_ratio": 0.5, "normalize": True},
    {"heavy_ratio": 0.5, "normalize": False, "num_sink_tokens": 4},
    {"heavy_ratio": 0.5, "normalize": False, "per_head": False},
    {"heavy_ratio": 0.75, "normalize": False},
    {"heavy_ratio": 0.9, "normalize": False},
    {"heavy_ratio": 0.9, "normalize": True},  # the default
    {"heavy_ratio": 1.0, "normalize": False},
    {"heavy_ratio": 1.0, "normalize": True},
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="+", help="indices into VARIANTS")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model, ids = load(args.threads)
    rows = load_rows(RESULTS / f"{STEM}.json")
    dense = rows.get("dense") or {"key": "dense", "settings": "dense (DynamicCache)"}
    if "ppl" not in dense:
        dense["ppl"] = compression_perplexity(model, lambda: hf_kvplus.make_cache("dynamic", model), ids)["ppl"]
        rows["dense"] = dense
    for index in args.only or range(len(VARIANTS)):
        variant = VARIANTS[index]
        key = json.dumps(variant, sort_keys=True)
        result = compression_perplexity(model, lambda: hf_kvplus.make_cache("h2o", model, budget=1024, **variant), ids)
        rows[key] = {"key": key, "settings": ", ".join(f"{k}={v}" for k, v in variant.items()), "ppl": result["ppl"]}
        print(f"{rows[key]['settings']:>50}  ppl {result['ppl']:.3f}", flush=True)
        _write(rows)
    print(_write(rows))


def _write(rows: dict) -> str:
    dense = rows["dense"]["ppl"]
    for row in rows.values():
        row["vs_dense"] = f"{100 * (row['ppl'] / dense - 1):+.1f}%"
    meta = {
        "protocol": "prefill 2048, keep 1024 (keep 0.5), score next 256 teacher-forced, 3 windows",
        "command": "PYTHONPATH=. python benchmarks/eviction_h2o_ablation.py " + " ".join(sys.argv[1:]),
    }
    return save(STEM, list(rows.values()), ["settings", "ppl", "vs_dense"], meta, "H2O settings at keep 0.5")


if __name__ == "__main__":
    main()
