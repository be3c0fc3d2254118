"""Studies: fixed experiments that are not a grid of strategies, run like recipes into a run folder.

* ``cost-of-caching``: :func:`~hf_kvplus.eval.generation_cost.generation_cost` (no cache against caches);
* ``prompt-order``: :func:`~hf_kvplus.eval.prompt_order.prompt_order` (a prefix cache and where the variable
  line goes).

``kvplus eval cost-of-caching --out DIR`` writes ``results.json``, ``results.csv``, ``summary.md`` and a plot
(``cost.png`` / ``prompt_order.png``) into ``DIR`` (default ``runs/<study>``) on the embedded model.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from .report import markdown_table

COST_COLUMNS = ["method", "new_tokens", "seconds", "tokens_per_s", "last_step_ms", "gflops", "gflops_per_token"]
ORDER_COLUMNS = ["turn", "ordering", "prompt_tokens", "reused_tokens", "prefill_tokens", "ttft_s"]


def _cost(model, tokenizer, progress: bool, new_tokens=None, prompt_tokens: int = 32, no_cache_max_new_tokens=128,
          sink_budget: int = 256, **_) -> tuple[list[dict], dict]:
    from ..registry import make_cache
    from .generation_cost import NO_CACHE, generation_cost
    from .models import load_default_text

    lengths = list(new_tokens or (64, 128, 256, 512, 1024))
    ids = tokenizer(load_default_text()[:4000], add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] < prompt_tokens:
        raise ValueError(f"prompt_tokens must be at most {ids.shape[1]}, got {prompt_tokens}")
    prompt = ids[:, :prompt_tokens].to(model.device)  # [1, P]
    methods = {
        NO_CACHE: None,
        "dynamic": lambda: make_cache("dynamic", model),
        f"sink budget={sink_budget}": lambda: make_cache("sink", model, budget=sink_budget),
        "int4": lambda: make_cache("int4", model),
    }
    rows = generation_cost(model, prompt, methods, lengths, no_cache_max_new_tokens, progress)
    options = {"prompt_tokens": prompt_tokens, "new_tokens": lengths, "no_cache_max_new_tokens": no_cache_max_new_tokens}
    return rows, options


def _order(model, tokenizer, progress: bool, turns: int | None = None, **_) -> tuple[list[dict], dict]:
    from .prompt_order import prompt_order

    turns = turns or 8
    return prompt_order(model, tokenizer, turns=turns, progress=progress), {"turns": turns}


STUDIES = {"cost-of-caching": _cost, "prompt-order": _order}


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def cost_summary(rows: list[dict], options: dict, seconds: float) -> str:
    cap = options["no_cache_max_new_tokens"]
    lines = [
        "# cost-of-caching\n",
        f"Greedy generation after a {options['prompt_tokens']}-token prompt, one `model.generate` call per method. "
        f"`seconds`: wall time to the N-th new token (prefill included); `last_step_ms`: the step that produced it; "
        f"`gflops`: estimated from the config (`hf_kvplus.eval.generation_cost.forward_flops`). `use_cache=False` is "
        f"measured up to {cap} new tokens (its cost grows quadratically); beyond that only its FLOPs are given.\n",
        markdown_table([{k: r[k] for k in COST_COLUMNS} for r in rows], COST_COLUMNS),
    ]
    ratios = []
    for n in options["new_tokens"]:
        none = next((r for r in rows if r["new_tokens"] == n and not r["use_cache"]), None)
        dense = next((r for r in rows if r["new_tokens"] == n and r["method"] == "dynamic"), None)
        if none and dense:
            speed = (none["seconds"] / dense["seconds"]) if none["seconds"] and dense["seconds"] else None
            ratios.append({"new_tokens": n, "FLOPs no cache / dynamic": none["gflops"] / dense["gflops"],
                           "time no cache / dynamic": speed})
    lines += ["Without a cache against `DynamicCache`:\n", markdown_table(ratios), "![time and work](cost.png)\n",
              f"Run time: {seconds:.0f} s.\n"]
    return "\n".join(lines)


def cost_plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        timed = [r for r in mine if r["measured"]]
        left.plot([r["new_tokens"] for r in timed], [r["seconds"] for r in timed], marker="o", label=method)
        right.plot([r["new_tokens"] for r in mine], [r["gflops"] for r in mine], marker="o", label=method)
    left.set(xlabel="new tokens N", ylabel="seconds to the N-th token (measured)", title="time")
    right.set(xlabel="new tokens N", ylabel="GFLOPs (estimated from the config)", title="work", yscale="log")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def order_summary(rows: list[dict], options: dict, seconds: float) -> str:
    table = sorted(rows, key=lambda r: (r["turn"], r["ordering"]))
    totals = []
    for ordering in dict.fromkeys(r["ordering"] for r in rows):
        mine = [r for r in rows if r["ordering"] == ordering]
        totals.append({"ordering": ordering, "prefill_tokens": sum(r["prefill_tokens"] for r in mine),
                       "reused_tokens": sum(r["reused_tokens"] for r in mine),
                       "ttft_s total": sum(r["ttft_s"] for r in mine), "store_mib": mine[-1]["store_mib"]})
    return "\n".join([
        "# prompt-order\n",
        f"A simulated agent loop of {options['turns']} turns through a `PrefixStore` (16-token blocks): a stable "
        "system prompt and tool list, then each turn appends a user message and a tool result. `stable_first` puts "
        "the turn's timestamp in the newest user message; `variable_first` puts it in a line before everything. "
        "`ttft_s`: store lookup + prefill of the tokens not reused + the first token.\n",
        markdown_table([{k: r[k] for k in ORDER_COLUMNS} for r in table], ORDER_COLUMNS),
        "Totals over the loop:\n", markdown_table(totals), "![per turn](prompt_order.png)\n", f"Run time: {seconds:.0f} s.\n",
    ])


def order_plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for ordering in dict.fromkeys(r["ordering"] for r in rows):
        mine = [r for r in rows if r["ordering"] == ordering]
        turns = [r["turn"] for r in mine]
        left.plot(turns, [r["prefill_tokens"] for r in mine], marker="o", label=f"{ordering}: prefilled")
        left.plot(turns, [r["reused_tokens"] for r in mine], marker="x", linestyle="--", label=f"{ordering}: reused")
        right.plot(turns, [r["ttft_s"] for r in mine], marker="o", label=ordering)
    left.set(xlabel="turn", ylabel="tokens", title="tokens prefilled and reused per turn")
    right.set(xlabel="turn", ylabel="seconds", title="time to first token")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_study(name: str, out=None, model=None, tokenizer=None, progress: bool = True, threads: int | None = None,
              **options) -> dict:
    """Run a study into a run folder: ``results.json``, ``results.csv``, ``summary.md`` and a plot.

    Args:
        name (`str`): ``"cost-of-caching"`` or ``"prompt-order"``.
        out (`str` or `Path`, *optional*): the run folder (default ``runs/<name>``).
        model, tokenizer (*optional*): default: the embedded model and its tokenizer.
        threads (`int`, *optional*): CPU threads for torch.
        **options: ``new_tokens`` (list), ``prompt_tokens``, ``no_cache_max_new_tokens`` (cost-of-caching);
            ``turns`` (prompt-order).

    Returns:
        `dict`: ``rows``, ``folder``, ``seconds``, ``files``.

    Example:

    ```python
    >>> run_study("prompt-order", out="runs/prompt-order", turns=4)["files"]
    ```
    """
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    started = time.perf_counter()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if model is None:
            from .models import load_default_model, load_default_tokenizer

            model, tokenizer = load_default_model(), load_default_tokenizer()
        rows, used = STUDIES[name](model, tokenizer, progress, **options)
    finally:
        torch.set_num_threads(previous)
    seconds = time.perf_counter() - started
    folder = Path(out or Path("runs") / name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"study": name, "options": used, "seconds": seconds,
                                                     "rows": rows}, indent=2) + "\n")
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if name == "cost-of-caching":
        plot, summary = cost_plot(rows, folder / "cost.png"), cost_summary(rows, used, seconds)
    else:
        plot, summary = order_plot(rows, folder / "prompt_order.png"), order_summary(rows, used, seconds)
    (folder / "summary.md").write_text(summary)
    files = [folder / "results.json", folder / "results.csv", folder / "summary.md", plot]
    return {"rows": rows, "folder": folder, "seconds": seconds, "files": files}
