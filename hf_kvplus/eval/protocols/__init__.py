"""Protocols a recipe can run, one module each, registered by name.

* ``compression`` (:mod:`.compression`): prefill ``context_length`` tokens, score the next ``target_length``
  teacher-forced (kvpress protocol), then time ``decode_tokens`` greedy steps;
* ``streaming`` (:mod:`.streaming`): feed ``num_tokens`` tokens through one cache and score every next token
  (StreamingLLM protocol);
* ``passkey`` (:mod:`.passkey`): hide a pass key in the text and ask for it back (exact match);
* ``cost_of_caching`` (:mod:`.cost_of_caching`): generation without a cache against caches, time and FLOPs;
* ``prompt_order`` (:mod:`.prompt_order`): an agent loop through a ``PrefixStore``, two orderings.

Every module of this package is imported when it is, so a new protocol is one new module holding a
:class:`Protocol` subclass decorated with :func:`register_protocol`; code outside the package registers
its own the same way.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Metric, Option, Protocol

PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    """Register a :class:`Protocol` subclass under its ``name`` (a class decorator); returns the class.

    Args:
        cls (`type[Protocol]`): the subclass; its ``name`` must be new, and its ``metrics`` name at least one column.

    Raises:
        TypeError: ``cls`` is not a ``Protocol`` subclass. ValueError: no name, a name already registered, or no metrics.

    Example:

    ```python
    >>> @register_protocol
    ... class MyProtocol(Protocol):
    ...     name, metrics = "mine", (Metric("perplexity", "", "ppl"),)
    ...     def run(self, model, tokenizer, ids, make_cache, options, progress=False):
    ...         return {"ppl": 1.0}
    >>> get_protocol("mine").name
    'mine'
    ```"""
    if not (isinstance(cls, type) and issubclass(cls, Protocol)):
        raise TypeError(f"register_protocol takes a Protocol subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"protocol {cls.__name__} needs a name (a non-empty string)")
    if cls.name in PROTOCOLS and type(PROTOCOLS[cls.name]) is not cls:
        raise ValueError(f"protocol {cls.name!r} is already registered ({type(PROTOCOLS[cls.name]).__name__})")
    if not cls.metrics:
        raise ValueError(f"protocol {cls.name!r} reports no metrics: set metrics = (Metric(name, unit, column), ...)")
    PROTOCOLS[cls.name] = cls()
    return cls


def get_protocol(name: str) -> Protocol:
    """The registered protocol called ``name``.

    Args:
        name (`str`): a protocol name (``compression``, ``streaming``, ``passkey``, ``cost_of_caching``...).

    Raises:
        ValueError: no such protocol; the message lists the registered ones.

    Example:

    ```python
    >>> [m.column for m in get_protocol("compression").metrics][:2]
    ['ppl', 'ppl_vs_dense']
    ```"""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PROTOCOLS", "Metric", "Option", "Protocol", "get_protocol", "register_protocol"]
