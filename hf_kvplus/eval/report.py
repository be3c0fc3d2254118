"""The run's ``summary.md``: one section per experiment, laid out from its protocol's metric schema."""

from __future__ import annotations

import json
from pathlib import Path

from .protocols import get_protocol
from .protocols.base import table_columns
from .recipe import needs_data
from .tables import markdown_table


def write_json(path: str | Path, payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


PEAK_GPU, PEAK_RSS = "peak GPU MiB", "peak RSS MiB"
PEAK_LINES = {
    PEAK_GPU: f"{PEAK_GPU}: CUDA `max_memory_allocated` while the grid point ran (model weights included).",
    PEAK_RSS: f"{PEAK_RSS}: the process's resident-set high-water mark while the grid point ran (model weights "
              "and Python included; reset per point on Linux).",
}


def peak_column(rows: list[dict]) -> str:
    """``"peak GPU MiB"`` when any row ran on CUDA (``device_peak_mib``), else ``"peak RSS MiB"``."""
    return PEAK_GPU if any(r.get("device_peak_mib") is not None for r in rows) else PEAK_RSS


def _display(row: dict, metrics) -> dict:
    """The row's values as the table shows them: each metric formatted by its unit, under its header."""
    shown = dict(row)
    for metric in metrics:
        shown[metric.title] = metric.format(row.get(metric.column))
    shown[PEAK_GPU], shown[PEAK_RSS] = row.get("device_peak_mib"), row.get("peak_rss_mib")
    return shown


def summary_markdown(recipe, rows: list[dict], excluded: list[dict] | None = None, plot: str | None = None,
                     folder: str | Path | None = None) -> str:
    """The Markdown summary of a run: one section per experiment, what was not measured.

    Each section is the protocol's description, a table of its metrics (the protocol's ``metrics`` schema: the
    shown columns, formatted by unit) with the peak memory column, and the blocks its ``summary`` adds
    (streaming curves, totals, a plot of its own written into ``folder``).

    Args:
        recipe (`Recipe`): the recipe that ran.
        rows (`list[dict]`): the result rows (``results.jsonl``).
        excluded (`list[dict]`, *optional*): ``{"strategy", "reason"}`` of strategies not measured.
        plot (`str`, *optional*): a plot file name to embed (the Pareto plot).
        folder (`str` or `Path`, *optional*): the run folder, where protocols write their own plots.

    Example:

    ```python
    >>> print(summary_markdown(recipe, rows, plot="pareto.png"))
    ```"""
    lines = [f"# {recipe.name}\n", f"{recipe.description.strip()}\n" if recipe.description else "",
             f"Model: `{recipe.model['id']}` ({recipe.model['dtype']}, {recipe.model['device']}). "
             + (f"Data: {recipe.data.describe()}.\n" if needs_data(recipe) else "Data: none (the protocol writes its prompts).\n")]
    for experiment in recipe.experiments:
        protocol = get_protocol(experiment.protocol)
        ok = [r for r in rows if r.get("experiment") == experiment.name and r.get("status") == "ok"]
        title = experiment.name if experiment.name == experiment.protocol else f"{experiment.name} ({experiment.protocol})"
        peak = peak_column(ok)
        metrics = table_columns(protocol)
        columns = list(protocol.label_columns) + [m.title for m in metrics]
        lines += [f"## {title}\n", protocol.describe(experiment.options) + " " + PEAK_LINES[peak] + "\n",
                  markdown_table([_display(r, metrics) for r in protocol.table_rows(ok)], columns + [peak]),
                  *protocol.summary(experiment, ok, folder)]
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
    text = summary_markdown(recipe, rows, excluded, plot.name if plot else None, folder)
    (folder / "summary.md").write_text(text)
    return text
