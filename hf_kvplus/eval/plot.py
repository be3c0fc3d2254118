"""The Pareto plot of a run: perplexity relative to dense (log axis) against KV cache memory, one line per strategy.

Labels are placed by adjustText (https://github.com/Phlya/adjustText) so they do not overlap; points far above
the rest (a sliding window without sinks, say: see :func:`y_limits`) are drawn at the top edge as arrows with
their value, so they do not squeeze every other strategy into a band at the bottom.
"""

from __future__ import annotations

from pathlib import Path

MARKERS = "osD^v<>pPXh*"
GAP = 1.5  # a jump of 1.5x between neighbouring values separates outliers (drawn at the top edge) from the rest
TICKS = (0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2, 3, 5, 10, 20, 50, 100, 1000)


def _short(row: dict) -> str:
    """The point's label: its keep ratio or budget, and its bits when it has them."""
    size = f"keep {row['keep_ratio']:g}" if "keep_ratio" in row else f"{row['budget']} tok" if "budget" in row else ""
    bits = f"{row['nbits']} bit" if row.get("nbits") else ""
    return " ".join(part for part in (size, bits) if part)


def _peak(rows: list[dict]) -> str:
    """``peak GPU 1,234 MiB`` (CUDA) or ``peak RSS 987 MiB`` (CPU): the largest over ``rows``."""
    gpu = [r["device_peak_mib"] for r in rows if r.get("device_peak_mib") is not None]
    rss = [r["peak_rss_mib"] for r in rows if r.get("peak_rss_mib") is not None]
    if gpu:
        return f"peak GPU {max(gpu):,.0f} MiB"
    return f"peak RSS {max(rss):,.0f} MiB" if rss else ""


def _axes(row: dict) -> tuple[str, str] | None:
    """``(x column, y column)`` of the row's protocol: its ``memory`` and ``quality`` metrics (``None``: not plotted).

    Rows that name no registered protocol are plotted on ``cache_mib`` and ``ppl``."""
    from .protocols import PROTOCOLS

    protocol = PROTOCOLS.get(row.get("protocol"))
    if protocol is None:
        return "cache_mib", "ppl"
    return (protocol.memory, protocol.quality) if protocol.quality and protocol.memory else None


def _metric_name(protocol_name: str, column: str) -> str:
    """The schema's words for ``column`` in protocol ``protocol_name`` (the column itself when unknown)."""
    from .protocols import PROTOCOLS

    protocol = PROTOCOLS.get(protocol_name)
    metric = next((m for m in protocol.metrics if m.column == column), None) if protocol else None
    return metric.name if metric else column


def y_limits(values: list[float]) -> tuple[float, float]:
    """``(low, high)`` of a panel's log axis; values above a wide gap fall outside and are drawn at the edge.

    With four values or more, the largest ratio between neighbouring sorted values is found; when it exceeds
    ``GAP`` and at most a third of the values lie above it, those values are outliers.

    Args:
        values (`list[float]`): the panel's positive y values (ratios to dense).

    Example:

    ```python
    >>> y_limits([1.0, 1.02, 1.1, 1.2, 1.3])[1] > 1.3  # all inside
    True
    >>> y_limits([1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 2.5])[1] < 2.5  # 2.5 is drawn at the edge
    True
    ```"""
    ordered = sorted(values)
    inside = ordered
    if len(ordered) >= 4:
        gaps = [(b / a, i) for i, (a, b) in enumerate(zip(ordered, ordered[1:], strict=False))]
        ratio, at = max(gaps)
        if ratio > GAP and len(ordered) - at - 1 <= len(ordered) / 3:
            inside = ordered[: at + 1]
    return inside[0] / 1.04, inside[-1] * 1.12


def pareto_plot(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Plot perplexity relative to dense against ``cache_mib``; one panel per experiment with perplexities.

    Each strategy is a line through its grid points (sorted by memory) on a log y axis of ``ppl`` divided by the
    dense ``dynamic`` row's (1.0, a dashed line and a black star), labelled with its keep ratio, budget or bits
    (placed without overlap by adjustText); a panel without a dense row plots ``ppl`` itself. Points above
    :func:`y_limits` are drawn as arrows at the top edge with their value. The legend gives each strategy's peak
    memory (CUDA ``max_memory_allocated`` on GPU, peak RSS on CPU, model weights included).

    Args:
        rows (`list[dict]`): rows of a run (``experiment``, ``strategy``, ``ppl``, ``cache_mib``, ``status``, and
            ``device_peak_mib`` / ``peak_rss_mib`` when measured).
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

    ok = [r for r in rows if r.get("status") == "ok" and _axes(r) is not None]
    ok = [r for r in ok if r.get(_axes(r)[1]) is not None and r[_axes(r)[1]] > 0 and r.get(_axes(r)[0]) is not None]
    experiments = list(dict.fromkeys(r["experiment"] for r in ok))
    if not experiments:
        return None
    columns = min(2, len(experiments))
    lines = -(-len(experiments) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(8 * columns, 6 * lines), squeeze=False)
    for ax in axes.flat[len(experiments):]:
        ax.set_visible(False)
    for ax, experiment in zip(axes.flat, experiments, strict=False):
        _panel(ax, [r for r in ok if r["experiment"] == experiment], experiment)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel(ax, here: list[dict], experiment: str) -> None:
    import matplotlib
    import matplotlib.ticker
    from adjustText import adjust_text

    xs, ys = _axes(here[0])  # the protocol's memory and quality columns (cache_mib, ppl)
    dense = next((r for r in here if r["strategy"] == "dynamic"), None)
    base = dense[ys] if dense else 1.0
    low, high = y_limits([r[ys] / base for r in here])
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    texts, edge, placed = [], [], []
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in here) if s != "dynamic"]
    for i, strategy in enumerate(strategies):
        points = sorted((r for r in here if r["strategy"] == strategy), key=lambda r: r[xs])
        x, y = [r[xs] for r in points], [min(r[ys] / base, high) for r in points]
        label = f"{strategy} ({_peak(points)})" if _peak(points) else strategy
        (line,) = ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], label=label, linewidth=1.5)
        placed += list(zip(x, y, strict=True))
        for r, shown in zip(points, y, strict=True):
            if r[ys] / base > high / 1.04:  # an outlier: an arrow at the edge with its value
                ax.plot([r[xs]], [shown], marker="^", color=line.get_color(), markersize=10)
                edge.append(ax.annotate(f"{strategy} {_short(r)}: {r[ys] / base:.1f}x", (r[xs], shown),
                                        xytext=(0, -14), textcoords="offset points", ha="center", fontsize=7,
                                        color=line.get_color()))
            elif _short(r):
                texts.append(ax.text(r[xs], shown, _short(r), fontsize=7, color=line.get_color()))
    if dense:
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, alpha=0.6)
        ax.plot([dense[xs]], [1.0], "k*", markersize=13,
                label=f"dense (dynamic): {ys} {dense[ys]:.3g}" + (f", {_peak([dense])}" if _peak([dense]) else ""))
    ticks = [t for t in TICKS if low <= t <= high]
    ax.set_yticks(ticks, [f"{t:g}x" if dense else f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if texts:  # labels move off each other and off the points; a grey line leads back when one moved far
        adjust_text(texts, x=[p[0] for p in placed], y=[p[1] for p in placed], ax=ax,
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    protocol = here[0].get("protocol", "")
    ax.set_title(experiment if experiment == protocol else f"{experiment} ({protocol})", fontsize=11)
    ax.set_xlabel(_metric_name(protocol, xs) + " (MiB)" if xs == "cache_mib" else _metric_name(protocol, xs))
    quality = _metric_name(protocol, ys)
    ax.set_ylabel(f"{quality} / dense (log; lower is better)" if dense else f"{quality} (log)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
