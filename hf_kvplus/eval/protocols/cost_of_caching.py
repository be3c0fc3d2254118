"""``cost_of_caching``: generate N tokens without a cache (``use_cache=False``) and with caches; time and FLOPs.

One grid point per method (``strategy: none`` is generation without a cache); each point reports one row per
length in ``new_tokens`` (:func:`hf_kvplus.eval.generation_cost`). ``kvplus eval cost-of-caching`` runs the
packaged recipe ``hf_kvplus/recipes/cost-of-caching.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from ..generation_cost import NO_CACHE, generation_cost
from ..tables import markdown_table
from . import register_protocol
from .base import Metric, Option, Protocol


def method_label(point) -> str:
    """``"no cache"``, ``"dynamic"``, ``"sink budget=256"``: the point's strategy and what its grid entry set."""
    if point.strategy == "none":
        return NO_CACHE
    settings = ", ".join(f"{k}={v}" for k, v in point.params.items())
    return f"{point.strategy} {settings}" if settings else point.strategy


@register_protocol
class CostOfCachingProtocol(Protocol):
    """Greedy generation of N new tokens after a ``prompt_tokens`` prompt, one ``model.generate`` call per method;
    the time of every step is recorded and the work estimated from the config
    (:func:`hf_kvplus.eval.forward_flops`). ``use_cache=False`` is timed up to ``no_cache_max_new_tokens``.

    Example:

    ```python
    >>> protocol = get_protocol("cost_of_caching")
    >>> rows = protocol.run(model, tokenizer, ids, None, protocol.parse_options({"new_tokens": [8, 16]}, "example"))
    >>> [(r["new_tokens"], r["gflops"]) for r in rows]
    ```"""

    name = "cost_of_caching"
    description = (
        "Greedy generation after a {prompt_tokens}-token prompt, one `model.generate` call per method. `seconds`: "
        "wall time to the N-th new token (prefill included); `last_step_ms`: the step that produced it; `gflops`: "
        "estimated from the config (`hf_kvplus.eval.generation_cost.forward_flops`). `use_cache=False` is measured up "
        "to {no_cache_max_new_tokens} new tokens (its cost grows quadratically); beyond that only its FLOPs are given.")
    options = {
        "new_tokens": Option([64, 128, 256, 512, 1024], "positive_list", help="lengths reported"),
        "prompt_tokens": Option(32, help="tokens of the prompt (the start of the text)"),
        "no_cache_max_new_tokens": Option(128, "non_negative", help="use_cache=False is timed up to here"),
    }
    metrics = (
        Metric("method: no cache, or a cache and its settings", "", "method"),
        Metric("tokens generated", "tokens", "new_tokens"),
        Metric("wall time to the N-th new token, prefill included", "s", "seconds"),
        Metric("new tokens per second", "tokens/s", "tokens_per_s"),
        Metric("time of the step that produced the N-th token", "ms", "last_step_ms"),
        Metric("estimated work", "GFLOP", "gflops"),
        Metric("estimated work per new token", "GFLOP", "gflops_per_token"),
        Metric("time measured (use_cache=False stops at its cap)", "", "measured", shown=False),
    )
    allows_no_cache, label_columns = True, ()

    def run(self, model, tokenizer, ids, make_cache, options, progress=False):
        if ids.numel() < options["prompt_tokens"]:
            raise ValueError(f"prompt_tokens must be at most {ids.numel()} (the text's tokens), "
                             f"got {options['prompt_tokens']}")
        prompt = ids[None, : options["prompt_tokens"]].to(model.device)  # [1, P]
        label = "cache" if make_cache is not None else NO_CACHE
        return generation_cost(model, prompt, {label: make_cache}, options["new_tokens"],
                               options["no_cache_max_new_tokens"], progress)

    def finish(self, rows, point):
        for row in rows:
            row["method"] = method_label(point)
        return rows

    def summary(self, experiment, rows, folder=None):
        ratios = []
        for n in experiment.options["new_tokens"]:
            none = next((r for r in rows if r["new_tokens"] == n and not r["use_cache"]), None)
            dense = next((r for r in rows if r["new_tokens"] == n and r["method"] == "dynamic"), None)
            if none and dense:
                speed = (none["seconds"] / dense["seconds"]) if none["seconds"] and dense["seconds"] else None
                ratios.append({"new_tokens": n, "FLOPs no cache / dynamic": none["gflops"] / dense["gflops"],
                               "time no cache / dynamic": speed})
        blocks = ["Without a cache against `DynamicCache`:\n", markdown_table(ratios)] if ratios else []
        if folder is not None and rows:
            plot = cost_plot(rows, Path(folder) / f"{experiment.name}.png")
            blocks.append(f"![time and work]({plot.name})\n")
        return blocks


def cost_plot(rows: list[dict], path: Path) -> Path:
    """Time (measured) and GFLOPs (estimated) against new tokens, one line per method; returns ``path``."""
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
