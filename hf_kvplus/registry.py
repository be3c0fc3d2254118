"""One registry: strategy name -> cache class, plus named presets.

The CLI, the recipes, the docs and the conformance suite all read this table, so a strategy
registered here is exercised everywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig

from ._compat import attn_implementation
from .config import decoder_config
from .hooks import attach, check_stable_rope


@dataclass(frozen=True)
class CacheSpec:
    """How to build and test one registered strategy.

    Attributes:
        name: registry name, as passed to ``make_cache``.
        factory: ``factory(config, **kwargs) -> Cache``.
        description: one line for tables and ``kvplus list``.
        paper: reference (arXiv id or URL).
        evicting: accepts ``budget=`` and drops tokens beyond it. ``None`` (the default): derived from the
            factory, true when it takes a ``budget`` argument.
        attention_scores: needs the ``"kvplus"`` attention implementation to score tokens. ``None``: derived
            from the factory's ``layer_class.needs_attention``.
        split_attention: reads a shared prefix through the ``"kvplus"`` attention without copying it (set on
            ``"sdpa"`` models only, see :func:`hf_kvplus.attach`). ``None``: derived from the factory's
            ``layer_class.split_attention``.
        uses_rope: the factory accepts ``rope=`` (read from the model by ``make_cache``). ``None``: derived
            from the factory's signature.
        from_model: ``from_model(model) -> dict`` of keyword arguments ``make_cache`` derives from a model
            (given keywords win), e.g. the model's default ``PrefixStore``.
        sweep: keyword arguments recipes sweep by default besides the budget, e.g. ``{"nbits": (8, 4, 2)}``
            (empty: evicting strategies sweep their budget, the others run once with their defaults).

    Example:

    ```python
    >>> spec = CacheSpec(name="valuenorm", factory=ValueNormCache, description="low value norms go first",
    ...                  sweep={"nbits": (None, 4)})
    >>> spec.evicting  # ValueNormCache takes a budget
    True
    >>> register_cache(spec)
    ```
    """

    name: str
    factory: Callable[..., Cache]
    description: str
    paper: str = ""
    evicting: bool | None = None
    attention_scores: bool | None = None
    uses_rope: bool | None = None
    split_attention: bool | None = None
    from_model: Callable[[torch.nn.Module], dict] | None = None
    sweep: dict = field(default_factory=dict)

    def __post_init__(self):
        """Flags left ``None`` are read from the factory, so a policy states them once, in its class."""
        try:
            params = inspect.signature(self.factory).parameters if callable(self.factory) else {}
        except (TypeError, ValueError):
            params = {}
        layer_class = getattr(self.factory, "layer_class", None)
        derived = {
            "evicting": "budget" in params,
            "attention_scores": bool(getattr(layer_class, "needs_attention", False)),
            "uses_rope": "rope" in params,
            "split_attention": bool(getattr(layer_class, "split_attention", False)),
        }
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)


_REGISTRY: dict[str, CacheSpec] = {}
_PRESETS: dict[str, tuple[str, dict]] = {}


def register_cache(spec: CacheSpec) -> CacheSpec:
    """Add a strategy to the registry (the name must be new).

    Args:
        spec (`CacheSpec`): the strategy's name, factory and test settings; the conformance suite
            picks up every registered spec.

    Example:

    ```python
    >>> register_cache(CacheSpec(name="valuenorm", factory=ValueNormCache, description="low value norms go first"))
    >>> cache = hf_kvplus.make_cache("valuenorm", model, budget=256)
    ```"""
    if not isinstance(spec, CacheSpec):
        raise TypeError(f"register_cache expects a hf_kvplus.CacheSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name or not callable(spec.factory):
        raise ValueError(f"a CacheSpec needs a non-empty name and a callable factory, got {spec.name!r}, {spec.factory!r}")
    if spec.name in _REGISTRY or spec.name in _PRESETS:
        raise ValueError(f"cache name {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def register_preset(name: str, strategy: str, **kwargs) -> None:
    """Register ``name`` as ``strategy`` with default keyword arguments.

    Args:
        name (`str`): the new preset name.
        strategy (`str`): a registered strategy.
        **kwargs: default keyword arguments (the caller's keywords win).

    Example:

    ```python
    >>> register_preset("sink4", "sink", num_sink_tokens=4)
    >>> cache = hf_kvplus.make_cache("sink4", model, budget=256)
    ```"""
    if not isinstance(name, str) or not name:
        raise TypeError(f"preset name must be a non-empty string, got {name!r}")
    if name in _REGISTRY or name in _PRESETS:
        raise ValueError(f"cache name {name!r} is already registered")
    if strategy not in _REGISTRY:
        raise ValueError(f"unknown strategy {strategy!r} for preset {name!r}; registered: {list_caches()}")
    _PRESETS[name] = (strategy, kwargs)


def list_caches() -> list[str]:
    """Names of the registered strategies (presets excluded; see :func:`list_presets`).

    Example:

    ```python
    >>> "h2o" in hf_kvplus.list_caches()
    True
    ```"""
    return list(_REGISTRY)


def list_presets() -> dict[str, tuple[str, dict]]:
    """Preset name -> ``(strategy, default keyword arguments)``.

    Example:

    ```python
    >>> hf_kvplus.list_presets()["int4"]
    ('quantized', {'nbits': 4})
    ```"""
    return {name: (strategy, dict(kwargs)) for name, (strategy, kwargs) in _PRESETS.items()}


def get_spec(name: str) -> CacheSpec:
    """The :class:`CacheSpec` of a strategy or preset name.

    Args:
        name (`str`): a registered strategy (:func:`list_caches`) or preset (:func:`list_presets`).

    Example:

    ```python
    >>> hf_kvplus.get_spec("int4").name  # a preset resolves to its strategy
    'quantized'
    ```"""
    if name in _PRESETS:
        name = _PRESETS[name][0]
    if name not in _REGISTRY:
        raise ValueError(f"unknown cache {name!r}; choose one of {list_caches() + list(_PRESETS)}")
    return _REGISTRY[name]


def resolve(name: str, **kwargs) -> tuple[CacheSpec, dict]:
    """Strategy spec and the full keyword arguments for a strategy or preset name."""
    if not isinstance(name, str):
        raise TypeError(f"cache name must be a string, got {type(name).__name__}")
    spec = get_spec(name)
    if name in _PRESETS:
        kwargs = {**_PRESETS[name][1], **kwargs}
    return spec, kwargs


def check_kwarg_names(spec: CacheSpec, kwargs: dict) -> None:
    """Raises ``TypeError`` naming the keyword arguments ``spec``'s factory does not take, and those it does."""
    params = inspect.signature(spec.factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("self", "config")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"cache {spec.name!r} got unexpected keyword argument(s) {unknown}; it accepts {allowed}")


def _require_budget(spec: CacheSpec, kwargs: dict) -> None:
    budget = inspect.signature(spec.factory).parameters.get("budget")
    if budget is not None and budget.default is inspect.Parameter.empty and "budget" not in kwargs:
        raise ValueError(f"cache {spec.name!r} evicts tokens: pass budget=<tokens kept per layer>, an integer >= 1")


def make_cache(name: str, model_or_config, **kwargs) -> Cache:
    """Build a ready cache to pass as ``model.generate(..., cache=cache)`` (``past_key_values=cache`` before transformers 5.24).

    Args:
        name (`str`): a registered strategy (``list_caches()``) or preset (``list_presets()``).
        model_or_config (`PreTrainedModel` or `PreTrainedConfig`): with a model, the one-time set-up
            the strategy needs is done on it (:func:`hf_kvplus.attach`: padding hook, and the
            ``"kvplus"`` attention for strategies that score by attention), and RoPE parameters are
            read from its rotary embedding.
        **kwargs: the strategy's keyword arguments (``budget=`` for every evicting strategy).

    Returns:
        `transformers.Cache`: a fresh, empty cache.

    Example:

    ```python
    >>> import hf_kvplus
    >>> cache = hf_kvplus.make_cache("sink", model, budget=256)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=128)
    ```
    """
    spec, kwargs = resolve(name, **kwargs)
    check_kwarg_names(spec, kwargs)
    _require_budget(spec, kwargs)
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
        config = getattr(model, "config", None)
        if not isinstance(config, PreTrainedConfig):
            raise TypeError(f"make_cache needs a transformers model or config, got {type(model).__name__}")
        if spec.name != "dynamic":
            check_stable_rope(model)  # before the settings: no setting makes a LongRoPE model work
        if spec.uses_rope and "rope" not in kwargs and kwargs.get("rerotate_keys", True):
            from ._compat import rope_parameters

            rope = rope_parameters(model)
            if rope is not None:
                kwargs["rope"] = rope
        if spec.from_model is not None:
            kwargs = {**spec.from_model(model), **kwargs}
    elif isinstance(model_or_config, PreTrainedConfig):
        config = model_or_config
        if spec.name != "dynamic":
            check_stable_rope(config)
    else:
        raise TypeError(
            f"make_cache needs a transformers model or PreTrainedConfig, got {type(model_or_config).__name__}"
        )
    decoder_config(config)  # every strategy, "dynamic" included, needs attention heads
    cache = spec.factory(config, **kwargs)  # refuses bad or degenerate settings before the model is touched
    if model_or_config is not config and spec.name != "dynamic":
        scores = spec.attention_scores or bool(getattr(cache, "needs_attention", False))  # a setting may need them
        attach(model_or_config, attention_scores=scores, split_attention=spec.split_attention)
    context = getattr(cache, "context", None)
    if model_or_config is not config and hasattr(context, "attention"):  # what assisted decoding will run on
        context.attention = attn_implementation(model_or_config)
    return cache


def _probe_config() -> PreTrainedConfig:
    """A small Llama-shaped config on which :func:`check_cache_kwargs` builds caches (no weights)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)


def check_cache_kwargs(name: str, **kwargs) -> None:
    """Raise the error ``make_cache(name, model, **kwargs)`` would raise for bad names or values, without a model.

    The cache is built on a small Llama-shaped config, so only what depends on the real model (for example a
    ``group_size`` dividing its ``head_dim``) is left for the first forward. Recipes call this while parsing.
    """
    spec, kwargs = resolve(name, **kwargs)
    check_kwarg_names(spec, kwargs)
    _require_budget(spec, kwargs)
    spec.factory(_probe_config(), **kwargs)


def _dynamic(config: PreTrainedConfig) -> DynamicCache:
    return DynamicCache(config=config)


register_cache(
    CacheSpec(
        name="dynamic",
        factory=_dynamic,
        description="transformers DynamicCache: every token, full precision (the baseline)",
    )
)
# Each strategy module registers itself at its end; hf_kvplus imports them all (quantized, eviction.scorers, prefix).
