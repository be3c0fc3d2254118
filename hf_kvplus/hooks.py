"""What hf_kvplus does to a user's model, and how it is undone: :func:`attach` and :func:`detach`.

Two public extension points, nothing patched:

* a forward pre-hook on the user's model instance (``torch.nn.Module.register_forward_pre_hook``)
  hands each hf_kvplus cache the 2-D (or 4-D) attention mask of the call, so evicting caches know
  which columns are left padding (and, to caches with ``observes_input_ids = True``, the call's ids);
* the ``"kvplus"`` attention of :mod:`hf_kvplus.attention`, set on the model only when a cache
  scores tokens by attention.

``make_cache(name, model)`` calls :func:`attach` for you.
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel

from ._compat import attn_implementation, cache_from_call
from .attention import ATTN_IMPLEMENTATION, register_attention

_HOOK_ATTR = "_hf_kvplus_input_hook"


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
    return dict(bound.arguments)


def _observe_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    inputs = _bound_inputs(module, args, kwargs)
    cache = cache_from_call(inputs)
    if cache is None or not hasattr(cache, "observe_inputs"):
        return None
    context = getattr(cache, "context", None)
    if context is not None and hasattr(context, "draft_rows"):
        # generate keeps the logits of the draft tokens it verifies and the row before them: the rows after the
        # first ``logits_to_keep - 1`` are drafts plain decoding would have run one at a time.
        keep = inputs.get("logits_to_keep")
        context.draft_rows = keep - 1 if isinstance(keep, int) and keep > 1 else 0
        context.attention = attn_implementation(module)
    tokens = inputs.get("input_ids")
    if tokens is None:
        tokens = inputs.get("inputs_embeds")
    if tokens is not None:
        if getattr(cache, "observes_input_ids", False):  # caches that key what they hold by token id (prefix)
            cache.observe_inputs(inputs.get("attention_mask"), tokens.shape[1], input_ids=inputs.get("input_ids"))
        else:
            cache.observe_inputs(inputs.get("attention_mask"), tokens.shape[1])
    return None


def attach(model: PreTrainedModel, attention_scores: bool = False) -> PreTrainedModel:
    """Prepare ``model`` for hf_kvplus caches (idempotent; returns the model).

    Args:
        model (`PreTrainedModel`): the model the caches will run with.
        attention_scores (`bool`, *optional*, defaults to `False`): also switch the model to the
            ``"kvplus"`` attention implementation, needed by caches that score keys by the
            attention they receive (H2O, TOVA). Its outputs are SDPA's up to float rounding.

    Example:

    ```python
    >>> import hf_kvplus
    >>> hf_kvplus.attach(model, attention_scores=True)
    >>> cache = hf_kvplus.HeavyHitterCache(model.config, budget=256)
    ```
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach() expects a transformers model (torch.nn.Module), got {type(model).__name__}")
    register_attention()
    if getattr(model, _HOOK_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_observe_inputs, with_kwargs=True)
        setattr(model, _HOOK_ATTR, handle)
    if attention_scores and attn_implementation(model) != ATTN_IMPLEMENTATION:
        current = attn_implementation(model)
        if current not in (None, "sdpa", "eager"):
            raise ValueError(
                f"attention scores need the 'kvplus' attention (SDPA-based); the model uses {current!r}. "
                "Load the model with attn_implementation='sdpa' (or 'eager') first."
            )
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def detach(model: PreTrainedModel) -> None:
    """Remove what :func:`attach` installed and return the model to ``"sdpa"`` attention.

    Args:
        model (`PreTrainedModel`): a model passed to :func:`attach` (or to ``make_cache``) before;
            a model never attached is left as it is.

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("h2o", model, budget=256)  # attaches, switches to "kvplus" attention
    >>> hf_kvplus.detach(model)  # hook removed, attention back to "sdpa"
    ```"""
    handle = getattr(model, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(model, _HOOK_ATTR, None)
    if attn_implementation(model) == ATTN_IMPLEMENTATION:
        model.set_attn_implementation("sdpa")
