"""Rows (lists of dicts) to Markdown tables and files."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (``columns`` default to the keys of the first row).

    Args:
        rows (`list[dict]`): one dict per row; missing values are left blank.
        columns (`list[str]`, *optional*): the columns, in order.

    Example:

    ```python
    >>> print(markdown_table([{"strategy": "sink", "ppl": 11.41}]))
    | strategy | ppl |
    |---|---|
    | sink | 11.41 |
    ```"""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


COLUMNS = {
    "compression": ["strategy", "settings", "ppl", "vs dense", "cache_mib", "saved", "decode_tok_s"],
    "streaming": ["strategy", "settings", "tokens_scored", "chunk_size", "exact", "ppl", "vs dense", "cache_mib",
                  "cache_mib_peak", "decode_tok_s"],
    "passkey": ["strategy", "settings", "exact_match", "ppl", "cache_mib", "saved"],
}
PROTOCOL_LINES = {
    "compression": "prefill {context_length} tokens through the cache, then score the next {target_length} "
                   "teacher-forced ({windows} window(s)); decode_tok_s: {decode_tokens} greedy steps right after.",
    "streaming": "feed {num_tokens} tokens through one cache, scoring every next token, {chunk_size} token(s) per "
                 "forward (1 is exact; more is an approximation unless the cache keeps every token).",
    "passkey": "hide a 5-digit pass key at depths {depths} of a {context_length}-token text ({samples} sample(s) "
               "per depth), ask for it back; exact_match is the share of keys returned exactly (greedy).",
}


PEAK_GPU, PEAK_RSS = "peak GPU MiB", "peak RSS MiB"
PEAK_LINES = {
    PEAK_GPU: f"{PEAK_GPU}: CUDA `max_memory_allocated` while the grid point ran (model weights included).",
    PEAK_RSS: f"{PEAK_RSS}: the process's resident-set high-water mark while the grid point ran (model weights "
              "and Python included; reset per point on Linux).",
}


def peak_column(rows: list[dict]) -> str:
    """``"peak GPU MiB"`` when any row ran on CUDA (``device_peak_mib``), else ``"peak RSS MiB"``."""
    return PEAK_GPU if any(r.get("device_peak_mib") is not None for r in rows) else PEAK_RSS


def _display(row: dict) -> dict:
    shown = dict(row)
    ratio, saved = row.get("ppl_vs_dense"), row.get("memory_saved")
    shown["vs dense"] = f"{ratio:.3f}x" if ratio is not None else None
    shown["saved"] = f"{saved:.0%}" if saved is not None else None
    shown[PEAK_GPU], shown[PEAK_RSS] = row.get("device_peak_mib"), row.get("peak_rss_mib")
    return shown


def _curve(rows: list[dict], every: int) -> list[dict]:
    """Perplexity and cache MiB of each ``every``-token window of a streaming experiment."""
    curves = [r for r in rows if r.get("window_ppl") and r.get("window_cache_mib")]
    length = max((len(r["window_ppl"]) for r in curves), default=0)
    table = []
    for i in range(length):
        line = {"tokens": every * (i + 1)}
        for r in curves:
            label = f"{r['strategy']} {r['settings']}".replace(", ", " ")
            if i < len(r["window_ppl"]):
                line[f"{label} ppl"] = r["window_ppl"][i]
                line[f"{label} MiB"] = r["window_cache_mib"][i]
        table.append(line)
    return table


def summary_markdown(recipe, rows: list[dict], excluded: list[dict] | None = None, plot: str | None = None) -> str:
    """The Markdown summary of a run: one table per experiment, streaming curves, what was not measured.

    Args:
        recipe (`Recipe`): the recipe that ran.
        rows (`list[dict]`): the result rows (``results.jsonl``).
        excluded (`list[dict]`, *optional*): ``{"strategy", "reason"}`` of strategies not measured.
        plot (`str`, *optional*): a plot file name to embed.

    Example:

    ```python
    >>> print(summary_markdown(recipe, rows, plot="pareto.png"))
    ```"""
    lines = [f"# {recipe.name}\n", f"{recipe.description.strip()}\n" if recipe.description else "",
             f"Model: `{recipe.model['id']}` ({recipe.model['dtype']}, {recipe.model['device']}). "
             f"Data: {recipe.data.describe()}.\n"]
    for experiment in recipe.experiments:
        ok = [r for r in rows if r.get("experiment") == experiment.name and r.get("status") == "ok"]
        described = PROTOCOL_LINES[experiment.protocol].format(**experiment.options)
        title = experiment.name if experiment.name == experiment.protocol else f"{experiment.name} ({experiment.protocol})"
        peak = peak_column(ok)
        lines += [f"## {title}\n", described + " " + PEAK_LINES[peak] + "\n",
                  markdown_table([_display(r) for r in ok], COLUMNS[experiment.protocol] + [peak])]
        if experiment.protocol == "streaming":
            every = experiment.options["report_every"]
            lines += [f"Perplexity and cache MiB of each {every}-token window:\n", markdown_table(_curve(ok, every))]
    missing = [{"experiment": r["experiment"], "strategy": r["strategy"], "settings": r.get("settings"),
                "status": r.get("status"), "reason": r.get("reason")} for r in rows if r.get("status") != "ok"]
    missing += [{**x, "status": "excluded"} for x in excluded or []]
    if missing:
        lines += ["## Not measured\n", markdown_table(missing, ["experiment", "strategy", "settings", "status", "reason"])]
    if plot:
        lines.append(f"![perplexity against cache memory]({plot})\n")
    return "\n".join(line for line in lines if line)


def write_report(folder: str | Path, recipe, rows: list[dict], excluded: list[dict] | None = None) -> str:
    """Write ``pareto.png`` and ``summary.md`` into the run folder; return the summary text."""
    from .plot import pareto_plot

    folder = Path(folder)
    plot = pareto_plot(rows, folder / "pareto.png", title=f"{recipe.name}: perplexity against KV cache memory")
    text = summary_markdown(recipe, rows, excluded, plot.name if plot else None)
    (folder / "summary.md").write_text(text)
    return text
