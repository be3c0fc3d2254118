"""The Pareto plot of a run: perplexity against KV cache memory, one line per strategy, dense as reference."""

from __future__ import annotations

from pathlib import Path

MARKERS = "osD^v<>pPXh*"


def _short(row: dict) -> str:
    """The point's label: its keep ratio or budget, and its bits when it has them."""
    size = f"keep {row['keep_ratio']:g}" if "keep_ratio" in row else f"{row['budget']} tok" if "budget" in row else ""
    bits = f"{row['nbits']} bit" if row.get("nbits") else ""
    return " ".join(part for part in (size, bits) if part)


def pareto_plot(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Plot ``ppl`` against ``cache_mib`` for every experiment with perplexities; one panel per experiment.

    Each strategy is a line through its grid points (sorted by memory), labelled with its keep ratio,
    budget or bits; the dense ``dynamic`` cache is a black star and a dashed horizontal line.

    Args:
        rows (`list[dict]`): rows of a run (``experiment``, ``strategy``, ``ppl``, ``cache_mib``, ``status``).
        path (`str` or `Path`): the PNG to write.
        title (`str`, *optional*): the figure title.

    Returns:
        `Path` of the PNG, or ``None`` when no row has a perplexity.

    Example:

    ```python
    >>> pareto_plot(run["rows"], "runs/default/pareto.png", title="default")
    ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("ppl") is not None]
    experiments = list(dict.fromkeys(r["experiment"] for r in ok))
    if not experiments:
        return None
    columns = min(2, len(experiments))
    rows_ = -(-len(experiments) // columns)
    fig, axes = plt.subplots(rows_, columns, figsize=(7.5 * columns, 5.5 * rows_), squeeze=False)
    for ax in axes.flat[len(experiments):]:
        ax.set_visible(False)
    for ax, experiment in zip(axes.flat, experiments):
        here = [r for r in ok if r["experiment"] == experiment]
        strategies = list(dict.fromkeys(r["strategy"] for r in here))
        for i, strategy in enumerate(s for s in strategies if s != "dynamic"):
            points = sorted((r for r in here if r["strategy"] == strategy), key=lambda r: r["cache_mib"])
            x, y = [r["cache_mib"] for r in points], [r["ppl"] for r in points]
            ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], label=strategy, linewidth=1.5)
            for r in points:
                ax.annotate(_short(r), (r["cache_mib"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for r in (r for r in here if r["strategy"] == "dynamic"):
            ax.axhline(r["ppl"], color="black", linestyle="--", linewidth=1, alpha=0.6)
            ax.plot([r["cache_mib"]], [r["ppl"]], "k*", markersize=13, label=f"dense (dynamic): {r['ppl']:.3g}")
        values = [r["ppl"] for r in here]
        if max(values) / max(min(values), 1e-9) > 3:
            ax.set_yscale("log")
        protocol = here[0].get("protocol", "")
        ax.set_title(experiment if experiment == protocol else f"{experiment} ({protocol})", fontsize=11)
        ax.set_xlabel("KV cache held (MiB)")
        answer = "answer " if protocol == "passkey" else ""
        ax.set_ylabel(f"{answer}perplexity (lower is better)")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
