"""Expand an experiment's grid into points, driven by the cache registry.

An entry names a strategy (or preset) and optional values; lists are swept (cartesian product):

* ``budget`` / ``keep_ratio``: tokens kept per layer (a ratio multiplies the protocol's context length);
  evicting strategies given neither use the experiment's ``keep_ratios`` / ``budgets``;
* protocol options (``chunk_size``, ``context_length`` ...): override the protocol for this entry;
* anything else: keyword arguments of the cache (``nbits``, ``num_sink_tokens`` ...); a strategy's
  ``CacheSpec.sweep`` supplies defaults for the ones the entry does not give.

``strategy: all`` stands for every registered strategy that no other entry names and ``exclude`` does not
list, so a newly registered strategy joins every sweep with no change to the recipe. ``strategy: none``
(protocols with ``allows_no_cache``, such as ``cost_of_caching``) is a point that runs without a cache.

A protocol builds its points with :meth:`~hf_kvplus.eval.protocols.Protocol.points`; the default is
:func:`strategy_points` below (:func:`hf_kvplus.eval.expand_grid` asks the experiment's protocol).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

from ..registry import check_cache_kwargs, check_kwarg_names, get_spec, list_caches, list_presets, resolve

SIZE_KEYS = ("budget", "keep_ratio")
NONE = "none"  # a point without a cache from the registry: the protocol gets make_cache=None


@dataclass
class Point:
    """One grid point: a strategy, its cache keyword arguments and the protocol options it runs with.

    Attributes:
        experiment (`str`): the experiment it belongs to.
        strategy (`str`): a registered strategy or preset name.
        params (`dict`): what the grid varied (``keep_ratio``, ``budget``, ``nbits``...), for tables.
        cache_kwargs (`dict`): keyword arguments of ``make_cache(strategy, model, **cache_kwargs)``.
        options (`dict`): protocol options for this point.
        origin (`str`, defaults to ``"explicit"``): ``"all"`` when it came from ``strategy: all``.
        skip_reason (`str`, *optional*): why the point is reported but not run.

    Example:

    ```python
    >>> points = load_recipe("default").experiments[0].points
    >>> points[0].strategy, points[0].cache_kwargs
    ('dynamic', {})
    ```"""

    experiment: str
    strategy: str
    params: dict  # what the grid chose: budget or keep_ratio, cache kwargs, protocol overrides
    cache_kwargs: dict
    options: dict
    origin: str = "explicit"  # "all" when it comes from `strategy: all`
    skip_reason: str | None = field(default=None)

    @property
    def key(self) -> str:
        return f"{self.experiment}|{self.strategy}|{json.dumps(self.params, sort_keys=True, default=str)}"

    @property
    def settings(self) -> str:
        if self.strategy == NONE and not self.params:
            return "no cache"
        shown = {k: v for k, v in self.params.items() if k != "keep_ratio"}
        if "keep_ratio" in self.params:
            shown = {"keep_ratio": self.params["keep_ratio"], **shown, "budget": self.cache_kwargs["budget"]}
        return ", ".join(f"{k}={v}" for k, v in shown.items()) or "all tokens"


def _sweep_values(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_names(name: str, kwargs: dict) -> None:
    """``TypeError`` for keyword arguments the strategy's factory does not take (values are checked at run time)."""
    spec, kwargs = resolve(name, **kwargs)
    check_kwarg_names(spec, kwargs)


def _entry_points(experiment, protocol, entry: dict, origin: str) -> list[Point]:
    name = entry["strategy"]
    where = f"experiment {experiment.name!r}, strategy {name!r}"
    if name == NONE:
        if not protocol.allows_no_cache:
            raise ValueError(f"{where}: protocol {protocol.name!r} needs a cache; 'none' (no cache) is for protocols "
                             "that compare against generation without one, such as cost_of_caching")
        if set(entry) != {"strategy"}:
            raise ValueError(f"{where}: 'none' takes no other values, got {sorted(set(entry) - {'strategy'})}")
        return [Point(experiment.name, NONE, {}, {}, dict(experiment.options), origin)]
    try:
        spec = get_spec(name)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    given = {k: v for k, v in entry.items() if k != "strategy"}
    if not spec.evicting and any(k in given for k in SIZE_KEYS):
        raise ValueError(f"{where}: {name!r} keeps every token, so budget/keep_ratio are not allowed; evicting "
                         f"strategies: {[n for n in list_caches() if get_spec(n).evicting]}")
    if "budget" in given and "keep_ratio" in given:
        raise ValueError(f"{where}: give budget or keep_ratio, not both")
    sizes = [{}]
    if spec.evicting and not any(k in given for k in SIZE_KEYS):
        sizes = [{"keep_ratio": r} for r in (experiment.keep_ratios if protocol.keep_ratio_base else [])]
        sizes += [{"budget": b} for b in experiment.budgets]
        if not sizes:
            raise ValueError(f"{where}: an evicting strategy needs a size: give budget or keep_ratio in the entry, or "
                             "budgets / keep_ratios in the experiment")
    fixed = list_presets().get(name, (name, {}))[1]  # a preset's own values are not swept (int4 stays 4-bit)
    swept = {**{k: v for k, v in spec.sweep.items() if k not in given and k not in fixed}, **given}
    if "keep_ratio" in swept and protocol.keep_ratio_base is None:
        raise ValueError(f"{where}: keep_ratio needs a protocol with a context length (protocol "
                         f"{protocol.name!r} has none); give budget instead")
    keys = list(swept)
    points = []
    for size in sizes:
        for values in itertools.product(*(_sweep_values(swept[k]) for k in keys)):
            params = {**size, **dict(zip(keys, values))}
            overrides = {k: v for k, v in params.items() if k in protocol.defaults}
            options = protocol.parse_options({**experiment.options, **overrides}, f"experiment {experiment.name!r}")
            kwargs = {k: v for k, v in params.items() if k not in protocol.defaults and k != "keep_ratio"}
            if "keep_ratio" in params:
                ratio = params["keep_ratio"]
                if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                    raise ValueError(f"bad keep_ratio {ratio!r} for {where}: allowed values are numbers in (0, 1]")
                kwargs["budget"] = max(1, round(ratio * options[protocol.keep_ratio_base]))
            if "budget" in params and (isinstance(params["budget"], bool) or not isinstance(params["budget"], int)
                                       or params["budget"] < 1):
                raise ValueError(f"bad budget {params['budget']!r} for {where}: allowed values are integers >= 1")
            try:
                if origin == "explicit":  # names and values, before any model loads
                    check_cache_kwargs(name, **kwargs)
                else:  # `strategy: all`: a strategy its defaults cannot build is reported as skipped by the runner
                    _check_names(name, kwargs)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{where}: {error}") from None
            points.append(Point(experiment.name, name, params, kwargs, options, origin))
    return points


def strategy_points(experiment, protocol) -> tuple[list[Point], list[dict]]:
    """``(points, not_measured)`` of a grid of cache strategies (the default :meth:`Protocol.points`).

    Args:
        experiment (`Experiment`): a parsed experiment; ``grid`` ``None`` means ``[{"strategy": "all"}]``.
        protocol (`Protocol`): its protocol (options a grid entry may override, ``keep_ratio_base``).
    """
    grid = experiment.grid if experiment.grid is not None else [{"strategy": "all"}]
    named = {entry["strategy"] for entry in grid if entry["strategy"] != "all"}
    for name in experiment.exclude:
        if name in named:
            raise ValueError(f"experiment {experiment.name!r} both lists and excludes strategy {name!r}")
    points, seen = [], set()
    for entry in grid:
        if entry["strategy"] == "all":
            extra = sorted(set(entry) - {"strategy"})
            if extra:
                raise ValueError(f"'strategy: all' takes no other values, got {extra}; use budgets/keep_ratios")
            expanded = [{"strategy": n} for n in list_caches() if n not in named and n not in experiment.exclude]
            new = [p for e in expanded for p in _entry_points(experiment, protocol, e, "all")]
        else:
            new = _entry_points(experiment, protocol, entry, "explicit")
        for point in new:
            if point.key not in seen:
                seen.add(point.key)
                points.append(point)
    registered = set(list_caches())
    excluded = [{"experiment": experiment.name, "strategy": n, "reason": r}
                for n, r in experiment.exclude.items() if n in registered]
    return points, excluded
