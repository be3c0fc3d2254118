"""Recipe files: model, data, and experiments (a protocol plus a grid of strategies) in YAML.

```yaml
name: my-sweep
model: {id: default, dtype: float32, device: cpu}   # "default", a local path or a Hub id; threads: N
data: {dataset: wikitext, config: wikitext-2-raw-v1, split: test, column: text}
experiments:
  - name: compression
    protocol: {name: compression, context_length: 2048, target_length: 256, windows: 3}
    keep_ratios: [0.5, 0.25, 0.1]      # evicting strategies: budget = ratio * context_length
    grid:
      - strategy: all                  # every registered strategy, each with its default sweep
      - {strategy: quantized, nbits: [8, 4, 2]}
    exclude: {prefix: "needs many requests sharing a prompt; see its own benchmark"}
```

See ``docs/recipes.md`` for every field. A recipe is validated once, by :func:`parse_recipe`, before any model
loads: every protocol option, every grid point (strategy names and values), and the local data files; the
parsed experiments hold their grid points, which the runner runs as they are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..validate import check_int
from .data import DataSpec
from .grid import Point
from .protocols import PROTOCOLS, get_protocol

PACKAGED = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_FIELDS = ("name", "description", "model", "data", "experiments")
EXPERIMENT_FIELDS = ("name", "protocol", "grid", "budgets", "keep_ratios", "exclude")
MODEL_FIELDS = ("id", "dtype", "device", "attn_implementation", "threads")


@dataclass
class Experiment:
    """One protocol over one grid. ``grid`` holds the raw entries; :mod:`.grid` expands them.

    Attributes:
        name (`str`): the experiment's name (a table in the summary, a panel in the plot).
        protocol (`str`): a registered protocol (``"compression"``, ``"streaming"``, ``"passkey"``,
            ``"cost_of_caching"``, ``"prompt_order"`` ...).
        options (`dict`): the protocol's options, defaults filled in (``context_length``...).
        grid (`list[dict]` or `None`): raw grid entries (``{"strategy": "all"}``, ``{"strategy": "sink", "budget": 256}``
            ...); ``None`` when the recipe gives none (the protocol's default: every strategy, or its own points).
        budgets (`list[int]`): budgets given to every evicting strategy without its own.
        keep_ratios (`list[float]`): shares of ``context_length`` kept, the alternative to budgets.
        exclude (`dict[str, str]`): strategies left out of ``strategy: all``, with the reason.
        points (`list[Point]`): the grid points, expanded and checked while parsing.
        excluded (`list[dict]`): ``{"experiment", "strategy", "reason"}`` of the strategies ``exclude`` leaves out.

    Example:

    ```python
    >>> experiment = load_recipe("default").experiments[0]
    >>> experiment.protocol, experiment.keep_ratios
    ('compression', [0.5, 0.125])
    ```"""

    name: str
    protocol: str
    options: dict
    grid: list[dict] | None
    budgets: list[int] = field(default_factory=list)
    keep_ratios: list[float] = field(default_factory=list)
    exclude: dict[str, str] = field(default_factory=dict)
    points: list = field(default_factory=list, repr=False)
    excluded: list[dict] = field(default_factory=list, repr=False)


@dataclass
class Recipe:
    """A parsed recipe.

    Attributes:
        name (`str`): the recipe's name (run folder, card, plot title).
        model (`dict`): ``id`` (``"default"``, a path or a Hub id), ``dtype``, ``device``, ``threads``.
        data (`DataSpec`): where the text comes from.
        experiments (`list[Experiment]`): what to run, in order.
        description (`str`, *optional*): a paragraph for the summary and the card.
        source (`str`, *optional*): the file it was read from.
        text (`str`, *optional*): the YAML text, copied into the run folder.

    Example:

    ```python
    >>> recipe = load_recipe("default")  # packaged with hf_kvplus; or a path to a YAML file
    >>> [e.name for e in recipe.experiments]
    ['compression', 'streaming']
    ```
    """

    name: str
    model: dict
    data: DataSpec
    experiments: list[Experiment]
    description: str = ""
    source: str = ""
    text: str = ""


def _mapping(value, where: str, allowed) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {where}; allowed: {list(allowed)}")
    return dict(value)


def _number_list(value, where: str, kind: type, low: float, high: float | None) -> list:
    values = value if isinstance(value, list) else [value]
    allowed = f"{'integers' if kind is int else 'numbers'} > {low}" + (f" and <= {high}" if high is not None else "")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float) if kind is float else int):
            raise ValueError(f"bad value {item!r} in {where}: allowed values are {allowed}")
        if item <= low or (high is not None and item > high):
            raise ValueError(f"bad value {item!r} in {where}: allowed values are {allowed}")
    if not values:
        raise ValueError(f"{where} is empty: give at least one value ({allowed})")
    return list(values)


def parse_model(value) -> dict:
    """``{"id", "dtype", "device", ...}`` from ``"default"``, a path / Hub id, or a mapping."""
    if value is None or isinstance(value, str):
        value = {"id": value or "default"}
    model = {"id": "default", "dtype": "float32", "device": "cpu", **_mapping(value, "model", MODEL_FIELDS)}
    from .models import parse_dtype

    parse_dtype(model["dtype"])
    threads = model.get("threads")
    check_int("threads", threads, allow_none=True, where="model")
    return model


def _parse_experiment(raw, index: int, overrides: dict) -> Experiment:
    where = f"experiments[{index}]"
    raw = _mapping(raw, where, EXPERIMENT_FIELDS)
    protocol = raw.get("protocol", "compression")
    if isinstance(protocol, str):
        protocol = {"name": protocol}
    if not isinstance(protocol, dict):
        raise TypeError(f"{where}.protocol must be a name or a mapping, got {type(protocol).__name__}")
    protocol = dict(protocol)
    name = protocol.pop("name", "compression")
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r} in {where}; choose one of {sorted(PROTOCOLS)}")
    owner = get_protocol(name)
    protocol.update({k: v for k, v in overrides.items() if k in owner.options})
    options = owner.parse_options(protocol, f"{where}.protocol")
    grid = raw.get("grid")
    if grid is not None:
        if not isinstance(grid, list) or not grid:
            raise ValueError(f"{where}.grid must be a non-empty list of entries such as {{strategy: sink, budget: [256]}}")
        grid = [{"strategy": entry} if isinstance(entry, str) else _mapping(entry, f"{where}.grid", list(entry))
                for entry in grid]
        for entry in grid:
            if "strategy" not in entry:
                raise ValueError(f"every entry of {where}.grid needs a strategy, got {entry}")
    exclude = raw.get("exclude") or {}
    if isinstance(exclude, list):
        exclude = {name: "excluded by the recipe" for name in exclude}
    exclude = {str(k): str(v) for k, v in _mapping(exclude, f"{where}.exclude", list(exclude)).items()}
    budgets = _number_list(raw["budgets"], f"{where}.budgets", int, 0, None) if "budgets" in raw else []
    ratios = _number_list(raw["keep_ratios"], f"{where}.keep_ratios", float, 0, 1) if "keep_ratios" in raw else []
    return Experiment(raw.get("name", name), name, options, grid, budgets, ratios, exclude)


def parse_recipe(raw: dict, source: str = "", text: str = "", options: dict | None = None) -> Recipe:
    """Validate a recipe mapping once: everything that can be checked without loading the model.

    Protocol options, grid points (strategy names and values: ``experiment.points``) and the local data files
    (when a protocol reads the text) are checked here; the runner runs the points as parsed.

    Args:
        raw (`dict`): the YAML mapping (``name``, ``model``, ``data``, ``experiments``...).
        source (`str`, *optional*): where it came from, for error messages.
        text (`str`, *optional*): the YAML text, kept in the run folder.
        options (`dict`, *optional*): protocol options set in every experiment whose protocol has them
            (``{"turns": 3}``); one that no experiment's protocol has raises ``ValueError``.

    Raises:
        ValueError / TypeError: a bad field, option or grid value (the message names what is allowed).
        FileNotFoundError: a local data file that does not exist.

    Example:

    ```python
    >>> recipe = parse_recipe({"name": "tiny", "experiments": [
    ...     {"name": "c", "protocol": {"name": "compression"}, "grid": [{"strategy": "sink", "budget": 256}]}]})
    ```"""
    raw = _mapping(raw, "recipe", RECIPE_FIELDS)
    experiments = raw.get("experiments")
    if not isinstance(experiments, list) or not experiments:
        raise ValueError("a recipe needs experiments: a non-empty list (see docs/recipes.md)")
    overrides = dict(options or {})
    parsed = [_parse_experiment(e, i, overrides) for i, e in enumerate(experiments)]
    names = [e.name for e in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment names must be unique, got {names}")
    accepted = {key for e in parsed for key in get_protocol(e.protocol).options}
    unused = sorted(set(overrides) - accepted)
    if unused:
        raise ValueError(f"option(s) {unused} belong to no protocol of this recipe "
                         f"{sorted({e.protocol for e in parsed})}; their options: {sorted(accepted)}")
    if overrides and text:  # the run folder's recipe.yaml must reproduce what ran
        raw = copy.deepcopy(raw)
        for entry, experiment in zip(raw["experiments"], parsed, strict=True):
            mine = {k: v for k, v in overrides.items() if k in get_protocol(experiment.protocol).options}
            if mine:
                protocol = entry.get("protocol", "compression")
                entry["protocol"] = {**({"name": protocol} if isinstance(protocol, str) else protocol), **mine}
        text = f"# {source or 'recipe'} with options {overrides}\n" + yaml.safe_dump(raw, sort_keys=False)
    name = raw.get("name") or (Path(source).stem if source else "recipe")
    recipe = Recipe(name, parse_model(raw.get("model")), DataSpec.parse(raw.get("data", "default")), parsed,
                    raw.get("description", ""), source, text)
    for experiment in parsed:  # strategy names and grid values fail here, before any model loads
        experiment.points, experiment.excluded = get_protocol(experiment.protocol).points(experiment)
    if needs_data(recipe):
        recipe.data.check_files()  # a missing data file fails here, before the model loads
    return recipe


def needs_data(recipe: Recipe) -> bool:
    """Whether any experiment's protocol reads the recipe's text (so it is tokenized and its files must exist)."""
    return any(get_protocol(e.protocol).needs_data for e in recipe.experiments)


def expand_grid(experiment) -> tuple[list[Point], list[dict]]:
    """``(points, not_measured)``: the grid points in order, and ``{"strategy", "reason"}`` for every
    registered strategy the experiment leaves out (``exclude``). Bad names and values raise ``ValueError``.

    The experiment's protocol decides (:meth:`~hf_kvplus.eval.protocols.Protocol.points`); for the perplexity
    protocols that is :func:`strategy_points`. A parsed recipe holds the result (``experiment.points``).

    Args:
        experiment (`Experiment`): a parsed experiment (its ``grid``, ``budgets``, ``keep_ratios``, ``exclude``).

    Example:

    ```python
    >>> points, excluded = expand_grid(load_recipe("default").experiments[0])
    >>> [(p.strategy, p.settings) for p in points][:2]
    [('dynamic', 'all tokens'), ('quantized', 'nbits=8')]
    ```
    """
    return get_protocol(experiment.protocol).points(experiment)


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped inside the package (``kvplus eval NAME``).

    Example:

    ```python
    >>> "default" in packaged_recipes()
    True
    ```"""
    return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def load_recipe(path_or_name: str | Path | None = None, options: dict | None = None) -> Recipe:
    """Read a recipe from a YAML file, or a packaged recipe by name (``None``: ``"default"``), and validate it.

    Args:
        path_or_name (`str` or `Path`, *optional*): a ``.yaml`` file or one of :func:`packaged_recipes`.
        options (`dict`, *optional*): protocol options to override (see :func:`parse_recipe`).

    Example:

    ```python
    >>> recipe = load_recipe("recipes/qwen2.5-7b-wikitext2.yaml")
    >>> recipe.model["id"], recipe.data.describe()
    ```
    """
    path = Path(path_or_name or "default")
    if not path.is_file():
        packaged = PACKAGED / f"{path_or_name or 'default'}.yaml"
        if str(path_or_name or "default") not in packaged_recipes():
            raise FileNotFoundError(f"recipe {str(path_or_name)!r} is neither a file nor a packaged recipe "
                                    f"{packaged_recipes()}")
        path = packaged
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    return parse_recipe(raw, str(path), text, options)
