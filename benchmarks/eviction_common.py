"""What the eviction benchmarks share: the compared strategies, loading, and writing results.

Each strategy is a registry name plus keyword arguments, so a row is exactly what
``hf_kvplus.make_cache(name, model, budget=..., **kwargs)`` builds. ``dense`` is transformers'
``DynamicCache`` (no budget).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import hf_kvplus
from hf_kvplus.eval import load_default_model, load_default_text, load_default_tokenizer
from hf_kvplus.eval.report import markdown_table, write_json

RESULTS = Path(__file__).resolve().parent / "results"

# label -> (registered name, keyword arguments besides the budget)
STRATEGIES: dict[str, tuple[str, dict]] = {
    "dense": ("dynamic", {}),
    "sink": ("sink", {}),
    "h2o": ("h2o", {}),
    "tova": ("tova", {}),
    "keynorm": ("keynorm", {}),
    "snapkv": ("snapkv", {}),
    "expected": ("expected", {}),
    "h2o+int4": ("h2o", {"nbits": 4}),
}


def build(model, label: str, budget: int | None, **options):
    """A fresh cache for ``label`` (``budget`` is ignored for the dense baseline); ``options`` add keywords."""
    name, kwargs = STRATEGIES[label]
    if name == "dynamic":
        return hf_kvplus.make_cache(name, model)
    return hf_kvplus.make_cache(name, model, budget=budget, **{**kwargs, **options})


def unavailable(model, label: str) -> str | None:
    """Why ``label`` cannot run in this checkout (for example quantized storage not merged yet), or ``None``."""
    try:
        build(model, label, 64)
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def load(threads: int | None = None):
    """The embedded model (fp32, CPU) and the token ids of the embedded text."""
    if threads:
        torch.set_num_threads(threads)
    model = load_default_model()
    ids = load_default_tokenizer()(load_default_text(), return_tensors="pt").input_ids[0]
    return model, ids


def load_rows(path: Path) -> dict[str, dict]:
    """Rows saved by an earlier (possibly interrupted) run, keyed by ``row["key"]``."""
    if not path.exists():
        return {}
    return {row["key"]: row for row in json.loads(path.read_text())["rows"]}


def save(stem: str, rows: list[dict], columns: list[str], meta: dict, title: str) -> str:
    """Write ``results/<stem>.json`` (every field) and ``results/<stem>.md`` (the table); return the table."""
    write_json(RESULTS / f"{stem}.json", {"meta": meta, "rows": rows})
    table = markdown_table(rows, columns)
    command = meta.get("command", "")
    (RESULTS / f"{stem}.md").write_text(f"# {title}\n\n{table}\nCommand: `{command}`\n")
    return table
