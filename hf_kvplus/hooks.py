"""What hf_kvplus does to a user's model, and how it is undone: :func:`attach` and :func:`detach`.

Two public extension points, nothing patched:

* a forward pre-hook on the user's model instance (``torch.nn.Module.register_forward_pre_hook``)
  hands each hf_kvplus cache the 2-D (or 4-D) attention mask of the call, so evicting caches know
  which columns are left padding (and, to caches with ``observes_input_ids = True``, the call's ids);
* for a forward that carries a cache scoring tokens by attention (H2O, TOVA, SnapKV), the same hook
  switches the model to the scoring attention matching the user's own implementation (``"sdpa"`` ->
  ``"kvplus"``, ``"eager"`` -> ``"kvplus_eager"``: same outputs, same returned attention weights), and a
  forward hook that runs even when the forward raises switches it back. Between forwards, and for calls
  with any other cache, the model runs exactly the implementation the user chose;
* the same per-forward switch to ``"kvplus"`` for a prefix-shared cache on a model running ``"sdpa"``, whose
  attention then reads the shared prefix in place (:mod:`hf_kvplus.cascade`: what SDPA computes, without the
  per-step copy); any other implementation is left as it is and reads the concatenated keys;
* after a forward given an hf_kvplus cache, a check that the model handed that cache back: a model that
  replaces it (as Phi-3's LongRoPE switch would, refused earlier by :func:`check_stable_rope`) is refused
  with a ``RuntimeError`` rather than letting generation continue without the cache.

``make_cache(name, model)`` calls :func:`attach` for you. The switch is per model and per call: one model
shared by threads that run scoring and non-scoring caches at once would see each other's switch.
"""

from __future__ import annotations

import inspect
import threading

import torch
from transformers import PreTrainedModel

from ._compat import attn_implementation, cache_from_call, output_cache, rope_switch, set_attn_implementation
from .attention_eager import VARIANTS, register_variants

_HOOK_ATTR = "_hf_kvplus_input_hook"
_RESTORE_ATTR = "_hf_kvplus_restore_hook"
_SWITCHED_ATTR = "_hf_kvplus_switched_from"  # the user's implementation while a forward runs on ours
_GIVEN = threading.local()  # per thread, {id(model): the hf_kvplus cache its running forward was given}


def scoring_implementation(current: str | None) -> str:
    """The scoring attention computing what ``current`` computes (``ValueError`` when there is none)."""
    if current in VARIANTS.values():  # the user set a scoring attention themselves
        return current
    if current in VARIANTS:
        return VARIANTS[current]
    raise ValueError(
        f"caches that score tokens by attention (h2o, tova, snapkv) support the 'sdpa' and 'eager' attention "
        f"implementations; the model uses {current!r}. Load it with attn_implementation='sdpa' or 'eager' "
        "(model.set_attn_implementation('sdpa')), or use a strategy that does not score by attention."
    )


def check_stable_rope(model) -> None:
    """Refuse a model (or config) whose rotary embedding switches frequencies mid-sequence (LongRoPE, the Phi-3 family).

    Past the switch, every key held was rotated with the old frequencies, and Phi-3's ``generate`` drops the cache
    to recompute them into a new ``DynamicCache``: a hf_kvplus cache would be bypassed (its budget, storage and
    sharing no longer apply) or would hold stale keys. Neither can be followed from a cache, so it is refused.

    Raises:
        ValueError: the model uses LongRoPE.
    """
    switch = rope_switch(model)
    if switch is not None:
        raise ValueError(
            f"{type(model).__name__.removesuffix('Config')} uses LongRoPE (rope_type='longrope'): past {switch} tokens its rotary embedding "
            "switches to other frequencies, and transformers then recomputes every key into a new DynamicCache, "
            "bypassing a hf_kvplus cache (its budget and storage would silently stop applying). hf_kvplus refuses "
            "such models: use transformers' DynamicCache, or load the model with rope_parameters of the short "
            f"factors only (rope_type='default' or 'linear') if prompt and generation stay within {switch} tokens."
        )


def _switch_attention(model: torch.nn.Module, verify: bool = False) -> None:
    current = attn_implementation(model)
    target = scoring_implementation(current)  # raises for an implementation with no scoring variant
    if verify:  # draft rows are replayed by the SDPA-based "kvplus" attention (eviction/verify.py)
        target = VARIANTS["sdpa"]
    if target != current:
        setattr(model, _SWITCHED_ATTR, current)
        set_attn_implementation(model, target)


def _switch_to_split_attention(model: torch.nn.Module) -> None:
    if attn_implementation(model) == "sdpa":
        setattr(model, _SWITCHED_ATTR, "sdpa")
        set_attn_implementation(model, VARIANTS["sdpa"])  # "kvplus": SDPA's math, and the prefix read in place


def _after_forward(model: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    """Runs after every forward, also one that raised (``output`` is then ``None``): the user's attention back,
    and the cache's forward ended (rolled back when it failed)."""
    previous = model.__dict__.pop(_SWITCHED_ATTR, None)
    if previous is not None:
        set_attn_implementation(model, previous)
    context = model.__dict__.pop("_hf_kvplus_context", None)
    given = _given().pop(id(model), None)
    if context is not None:
        context.end_forward(failed=output is None)
    returned = output_cache(output) if given is not None and hasattr(output, "keys") else None
    if returned is not None and returned is not given:
        raise RuntimeError(
            f"{type(model).__name__} was given a {type(given).__name__} but returned a {type(returned).__name__}: the "
            "model replaced the hf_kvplus cache, so its budget, storage and sharing would silently stop applying "
            "to the rest of the generation. hf_kvplus refuses to continue; run this model with transformers' "
            "DynamicCache, or without whatever makes it re-create its cache."
        )


def _given() -> dict:
    if not hasattr(_GIVEN, "caches"):
        _GIVEN.caches = {}
    return _GIVEN.caches


def _bound_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return kwargs
    signature = getattr(module, "_hf_kvplus_signature", None)
    if signature is None:
        signature = inspect.signature(module.forward)
        module._hf_kvplus_signature = signature
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return kwargs
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():  # a forward(input_ids, **kwargs): its keywords, flat
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _observe_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    _given().pop(id(module), None)  # left by a forward whose pre-hook raised
    inputs = _bound_inputs(module, args, kwargs)
    cache = cache_from_call(inputs)
    if cache is None:
        return None
    context = getattr(cache, "context", None)
    if context is not None and hasattr(context, "draft_rows"):
        # generate keeps the logits of the draft tokens it verifies and the row before them: the rows after the
        # first ``logits_to_keep - 1`` are drafts plain decoding would have run one at a time.
        keep = inputs.get("logits_to_keep")
        context.draft_rows = keep - 1 if isinstance(keep, int) and keep > 1 else 0
        context.attention = attn_implementation(module)
    if hasattr(context, "begin_forward"):  # a refused forward is rolled back (eviction/journal.py)
        context.begin_forward()
        module._hf_kvplus_context = context
    if context is not None:  # an hf_kvplus cache: the forward must hand back this one (checked after it)
        _given()[id(module)] = cache
    if hasattr(cache, "observe_inputs"):
        _observe(cache, inputs)
    # last: nothing after a switch may raise before the forward hook is armed
    if getattr(context, "draft_rows", 0) and getattr(cache, "evicts", False):
        _switch_attention(module, verify=True)  # drafts are verified row by row in the "kvplus" attention
    elif getattr(cache, "needs_attention", False):
        _switch_attention(module)
    elif getattr(cache, "split_attention", False):
        _switch_to_split_attention(module)
    return None


def _observe(cache, inputs: dict) -> None:
    tokens = inputs.get("input_ids")
    if tokens is None:
        tokens = inputs.get("inputs_embeds")
    if tokens is not None:
        if getattr(cache, "observes_input_ids", False):  # caches that key what they hold by token id (prefix)
            cache.observe_inputs(inputs.get("attention_mask"), tokens.shape[1], input_ids=inputs.get("input_ids"))
        else:
            cache.observe_inputs(inputs.get("attention_mask"), tokens.shape[1])


def attach(model: PreTrainedModel, attention_scores: bool = False, split_attention: bool = False) -> PreTrainedModel:
    """Prepare ``model`` for hf_kvplus caches (idempotent; returns the model).

    Args:
        model (`PreTrainedModel`): the model the caches will run with.
        attention_scores (`bool`, *optional*, defaults to `False`): check now that the model's attention
            implementation has a scoring variant (``"sdpa"`` or ``"eager"``), needed by caches that score keys
            by the attention they receive (H2O, TOVA, SnapKV); the switch itself happens per forward.
        split_attention (`bool`, *optional*, defaults to `False`): accepted for prefix-shared caches, which need
            nothing checked: their forwards on an ``"sdpa"`` model run the ``"kvplus"`` attention, which reads
            the shared prefix without copying it (:mod:`hf_kvplus.cascade`); other implementations are left as
            they are.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``attention_scores`` and an implementation with no scoring variant (flash attention, ...).

    Example:

    ```python
    >>> import hf_kvplus
    >>> hf_kvplus.attach(model, attention_scores=True)
    >>> cache = hf_kvplus.HeavyHitterCache(model.config, budget=256)
    ```
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach() expects a transformers model (torch.nn.Module), got {type(model).__name__}")
    if attention_scores:
        scoring_implementation(attn_implementation(model))  # refuse before anything changes
    check_stable_rope(model)
    register_variants()
    if getattr(model, _HOOK_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_observe_inputs, with_kwargs=True)
        setattr(model, _HOOK_ATTR, handle)
        restore = model.register_forward_hook(_after_forward, with_kwargs=True, always_call=True)
        setattr(model, _RESTORE_ATTR, restore)
    return model


def detach(model: PreTrainedModel) -> None:
    """Remove what :func:`attach` installed; the model keeps the attention implementation it had before.

    Args:
        model (`PreTrainedModel`): a model passed to :func:`attach` (or to ``make_cache``) before;
            a model never attached is left as it is.

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("h2o", model, budget=256)  # attaches: hooks only
    >>> hf_kvplus.detach(model)  # hooks removed; attention as the user loaded it
    ```"""
    for name in (_HOOK_ATTR, _RESTORE_ATTR):
        handle = getattr(model, name, None)
        if handle is not None:
            handle.remove()
            setattr(model, name, None)
    previous = model.__dict__.pop(_SWITCHED_ATTR, None)
    if previous is not None:
        set_attn_implementation(model, previous)
