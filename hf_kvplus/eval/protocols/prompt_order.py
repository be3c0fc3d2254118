"""``prompt_order``: an agent loop through a ``PrefixStore``, stable content first or a timestamp first.

One grid point per ordering (``orderings``), each reporting one row per turn
(:func:`hf_kvplus.eval.prompt_order`). ``kvplus eval prompt-order`` runs the packaged recipe
``hf_kvplus/recipes/prompt-order.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from ..grid import NONE, Point
from ..prompt_order import ORDERINGS, prompt_order
from ..tables import markdown_table
from . import register_protocol
from .base import Metric, Option, Protocol


@register_protocol
class PromptOrderProtocol(Protocol):
    """Run a simulated agent loop of ``turns`` turns once per ordering, each through a fresh ``PrefixStore``
    (``block_size``-token blocks); each turn looks up the longest cached prefix, prefills the rest and computes
    the first token. The grid is the orderings, not cache strategies (a recipe gives no ``grid``).

    Example:

    ```python
    >>> protocol = get_protocol("prompt_order")
    >>> options = {**protocol.parse_options({"turns": 4}, "example"), "ordering": "stable_first"}
    >>> [r["reused_tokens"] for r in protocol.run(model, tokenizer, None, None, options)]
    ```"""

    name = "prompt_order"
    description = (
        "A simulated agent loop of {turns} turns through a `PrefixStore` ({block_size}-token blocks): a stable system "
        "prompt and tool list, then each turn appends a user message and a tool result. `stable_first` puts the "
        "turn's timestamp in the newest user message; `variable_first` puts it in a line before everything. "
        "`ttft_s`: store lookup + prefill of the tokens not reused + the first token.")
    options = {
        "turns": Option(8, help="turns of the agent loop"),
        "orderings": Option(list(ORDERINGS), "choices", choices=ORDERINGS, help="orderings compared"),
        "block_size": Option(16, help="PrefixStore block size"),
    }
    metrics = (
        Metric("turn of the loop", "", "turn"),
        Metric("where the variable line goes", "", "ordering"),
        Metric("tokens of the turn's prompt", "tokens", "prompt_tokens"),
        Metric("tokens reused from the store", "tokens", "reused_tokens"),
        Metric("tokens prefilled", "tokens", "prefill_tokens"),
        Metric("time to first token", "s", "ttft_s"),
        Metric("bytes held by the store after the turn", "MiB", "store_mib", shown=False),
    )
    needs_data, label_columns = False, ()

    def points(self, experiment):
        if experiment.grid is not None:
            raise ValueError(f"experiment {experiment.name!r}: protocol {self.name!r} takes no grid (its points are "
                             f"its orderings {experiment.options['orderings']}); remove grid")
        points = [Point(experiment.name, NONE, {"ordering": o}, {}, {**experiment.options, "ordering": o}, "protocol")
                  for o in experiment.options["orderings"]]  # the protocol holds its own PrefixStore
        return points, []

    def run(self, model, tokenizer, ids, make_cache, options, progress=False):
        return prompt_order(model, tokenizer, turns=options["turns"], orderings=(options["ordering"],),
                            block_size=options["block_size"], progress=progress)

    def table_rows(self, rows):
        return sorted(rows, key=lambda r: (r["turn"], r["ordering"]))

    def summary(self, experiment, rows, folder=None):
        totals = []
        for ordering in dict.fromkeys(r["ordering"] for r in rows):
            mine = [r for r in rows if r["ordering"] == ordering]
            totals.append({"ordering": ordering, "prefill_tokens": sum(r["prefill_tokens"] for r in mine),
                           "reused_tokens": sum(r["reused_tokens"] for r in mine),
                           "ttft_s total": sum(r["ttft_s"] for r in mine), "store_mib": mine[-1]["store_mib"]})
        blocks = ["Totals over the loop:\n", markdown_table(totals)] if totals else []
        if folder is not None and rows:
            plot = order_plot(rows, Path(folder) / f"{experiment.name}.png")
            blocks.append(f"![per turn]({plot.name})\n")
        return blocks


def order_plot(rows: list[dict], path: Path) -> Path:
    """Tokens prefilled and reused, and time to first token, per turn and ordering; returns ``path``."""
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
