"""The protocol base class: one class owns a protocol's options, run, metric schema and description.

A protocol turns ``(model, tokenizer, token ids, a cache factory, options)`` into rows of metrics. The runner
(:mod:`hf_kvplus.eval.runner`) expands a recipe's experiments into grid points through :meth:`Protocol.points`,
calls :meth:`Protocol.run` once per point and writes the rows into the run folder (resumable, shared among
``accelerate`` processes); the summary (:mod:`..report`), the CSV (:mod:`..results`) and the Pareto plot
(:mod:`..plot`) read the columns and units from :attr:`Protocol.metrics`. Adding a protocol is one module with
one subclass decorated with :func:`register_protocol` (see ``docs/recipes.md``, "Adding a protocol").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ...validate import check_int

KINDS = ("positive", "non_negative", "ratios", "positive_list", "choices")


@dataclass(frozen=True)
class Metric:
    """One column a protocol reports: what it is, its unit and the row key that holds it.

    Attributes:
        name (`str`): what it measures, in words (``"perplexity of the scored tokens"``).
        unit (`str`): ``""`` (a plain number), ``"MiB"``, ``"tokens/s"``, ``"s"``, ``"x"`` (a ratio, shown
            as ``1.234x``) or ``"share"`` (a fraction, shown as a percentage).
        column (`str`): the row key (and CSV column), e.g. ``"ppl"``.
        header (`str`, *optional*): the summary table's header (default: ``column``).
        shown (`bool`, defaults to `True`): in the summary table (always in the CSV).

    Example:

    ```python
    >>> Metric("KV cache held after prefill", "MiB", "cache_mib").format(45.25)
    '45.25'
    ```"""

    name: str
    unit: str
    column: str
    header: str | None = None
    shown: bool = True

    @property
    def title(self) -> str:
        return self.header or self.column

    def format(self, value) -> Any:
        """The value as the summary shows it (ratios as ``1.234x``, shares as percentages, others unchanged)."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        if self.unit == "x":
            return f"{value:.3f}x"
        if self.unit == "share":
            return f"{value:.0%}"
        return value


@dataclass(frozen=True)
class Option:
    """One protocol option: its default and what values it allows.

    Attributes:
        default: the value when the recipe does not give one (``None`` allowed only when the default is ``None``).
        kind (`str`, defaults to ``"positive"``): ``"positive"`` (integer >= 1), ``"non_negative"`` (integer >= 0),
            ``"ratios"`` (a number or list of numbers in (0, 1]), ``"positive_list"`` (a list of integers >= 1) or
            ``"choices"`` (a list whose items are among ``choices``).
        choices (`tuple`, *optional*): the allowed items of a ``"choices"`` option.
        help (`str`, *optional*): one line for the docs.

    Example:

    ```python
    >>> Option(1024).parse("context_length", 512, "experiments[0].protocol")
    512
    ```"""

    default: Any
    kind: str = "positive"
    choices: tuple = ()
    help: str = ""

    def parse(self, name: str, value, where: str):
        """``value`` checked (and lists normalised); a bad one raises ``ValueError`` naming what is allowed."""
        if value is None and self.default is None:
            return None
        if self.kind == "positive":
            check_int(name, value, where=where)
            return value
        if self.kind == "non_negative":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"bad value {value!r} for {where}.{name}: allowed values are integers >= 0")
            return value
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ValueError(f"{where}.{name} is empty: give at least one value")
        for item in values:
            if self.kind == "ratios":
                if isinstance(item, bool) or not isinstance(item, (int, float)) or not 0 < item <= 1:
                    raise ValueError(f"bad value {item!r} in {where}.{name}: allowed values are numbers in (0, 1]")
            elif self.kind == "positive_list":
                if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                    raise ValueError(f"bad value {item!r} in {where}.{name}: allowed values are integers >= 1")
            elif item not in self.choices:
                raise ValueError(f"bad value {item!r} in {where}.{name}: allowed values are {list(self.choices)}")
        return [float(v) for v in values] if self.kind == "ratios" else values


class Protocol:
    """Base class of the protocols a recipe names (``protocol: {name: ..., option: value}``).

    A subclass sets the class attributes and implements :meth:`run`; everything else has a default. The
    summary, CSV and plot read :attr:`metrics`, so a new protocol needs no change anywhere else.

    Attributes:
        name (`str`): the name recipes use.
        description (`str`): one paragraph for the summary, formatted with the options (``{context_length}``).
        options (`dict[str, Option]`): every option with its default and allowed values.
        metrics (`tuple[Metric, ...]`): the columns :meth:`run` reports, in table order.
        quality (`str`, *optional*): the column compared with the dense cache (``ppl_vs_dense``) and plotted on
            the Pareto plot's y axis; ``None`` for protocols that are not a quality-against-memory sweep.
        memory (`str`, *optional*): the column of memory held (``memory_saved``, the Pareto plot's x axis).
        keep_ratio_base (`str`, *optional*): the option a grid's ``keep_ratio`` multiplies into a budget.
        needs_data (`bool`, defaults to `True`): whether :meth:`run` reads the recipe's text (else no tokenizing).
        allows_no_cache (`bool`, defaults to `False`): whether a grid entry ``strategy: none`` (no cache:
            ``make_cache`` is ``None``) is allowed.
        label_columns (`tuple[str, ...]`, defaults to ``("strategy", "settings")``): the summary table's first
            columns, before the metrics (empty when a metric such as ``method`` names the row itself).

    Example:

    ```python
    >>> from hf_kvplus.eval import Metric, Option, Protocol, register_protocol
    >>> @register_protocol
    ... class FirstToken(Protocol):
    ...     name = "first-token"
    ...     description = "negative log-likelihood of token {position} after a prefill through the cache."
    ...     options = {"position": Option(16)}
    ...     metrics = (Metric("negative log-likelihood", "nats", "nll"),)
    ...
    ...     def run(self, model, tokenizer, ids, make_cache, options, progress=False):
    ...         ...  # return {"nll": ...} (one row) or a list of rows
    ```
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    metrics: ClassVar[tuple[Metric, ...]] = ()
    quality: ClassVar[str | None] = None
    memory: ClassVar[str | None] = None
    keep_ratio_base: ClassVar[str | None] = None
    needs_data: ClassVar[bool] = True
    allows_no_cache: ClassVar[bool] = False
    label_columns: ClassVar[tuple[str, ...]] = ("strategy", "settings")

    @property
    def defaults(self) -> dict:
        """``{option: default}``."""
        return {key: option.default for key, option in self.options.items()}

    def parse_options(self, raw: dict, where: str) -> dict:
        """Defaults overridden by ``raw``; an unknown option or a bad value raises ``ValueError`` naming what is allowed.

        Args:
            raw (`dict`): options given by the recipe (or a grid entry).
            where (`str`): where they come from, for error messages (``"experiments[0].protocol"``).

        Raises:
            TypeError: ``raw`` is not a mapping. ValueError: an unknown option or a value it does not allow.
        """
        if not isinstance(raw, dict):
            raise TypeError(f"{where} must be a mapping of options, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(self.options))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for protocol {self.name!r}; allowed: {sorted(self.options)}")
        given = {**self.defaults, **raw}
        return {key: self.options[key].parse(key, value, where) for key, value in given.items()}

    def describe(self, options: dict) -> str:
        """:attr:`description` with the options filled in."""
        return self.description.format(**options)

    def points(self, experiment) -> tuple[list, list[dict]]:
        """``(points, excluded)`` of an experiment: by default its grid of cache strategies (:mod:`..grid`).

        Args:
            experiment (`Experiment`): a parsed experiment of this protocol.
        """
        from ..grid import strategy_points

        return strategy_points(experiment, self)

    def run(self, model, tokenizer, ids, make_cache, options: dict, progress: bool = False) -> dict | list[dict]:
        """Measure one grid point: a dict (one row) or a list of dicts (several rows) holding :attr:`metrics`.

        Args:
            model (`PreTrainedModel`): the model. tokenizer: its tokenizer.
            ids (`torch.LongTensor`): ``[tokens]`` of the recipe's text (``None`` when :attr:`needs_data` is false).
            make_cache (`Callable[[], Cache]` or `None`): a fresh cache per call; ``None`` for ``strategy: none``.
            options (`dict`): the point's options (:meth:`parse_options`).
            progress (`bool`): show a progress bar.

        Byte counts under keys holding ``cache_bytes`` (``cache_bytes``, ``cache_bytes_peak``,
        ``window_cache_bytes``) are turned into MiB by the runner (``cache_mib`` ...).
        """
        raise NotImplementedError(f"protocol {self.name!r} does not implement run()")

    def finish(self, rows: list[dict], point) -> list[dict]:
        """Adjust the rows of one point with what only the point knows (its strategy); by default unchanged."""
        return rows

    def table_rows(self, rows: list[dict]) -> list[dict]:
        """The ``status: ok`` rows of one experiment in the order the summary lists them (default: grid order)."""
        return rows

    def summary(self, experiment, rows: list[dict], folder: Path | None = None) -> list[str]:
        """Markdown blocks after the experiment's table (curves, totals, a plot written into ``folder``)."""
        return []


def table_columns(protocol: Protocol) -> list[Metric]:
    """The metrics shown in the summary table of ``protocol`` (``shown`` ones, in order)."""
    return [metric for metric in protocol.metrics if metric.shown]


def is_number(value) -> bool:
    """A finite ``int``/``float`` (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
