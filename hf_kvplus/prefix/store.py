"""PrefixStore: a :class:`~hf_kvplus.prefix.pool.PrefixPool` bound to a model, and the caches that read it.

The pool is model-free (token ids and tensors); this module adds what a transformers user calls:
:meth:`PrefixStore.cache_for` (a ``transformers.Cache`` already holding the longest cached prefix),
:meth:`PrefixStore.save` / :meth:`PrefixStore.load` (safetensors), :meth:`PrefixStore.bind` (which
model the KV belongs to), the model's default store, and the ``"prefix"`` registry entry.
"""

from __future__ import annotations

import weakref

import torch
from transformers import PreTrainedConfig

from ..hooks import attach
from ..registry import CacheSpec, register_cache
from .cache import PrefixSharedCache
from .io import check_fingerprint, load_store, model_fingerprint, save_store
from .pool import PrefixPool


class PrefixStore(PrefixPool):
    """Cached KV of token-id prefixes for one model, shared without copies by every request that starts with them.

    A :class:`~hf_kvplus.prefix.pool.PrefixPool` (same arguments) with the model-facing methods.

    Args:
        max_bytes (`int`, *optional*, defaults to 1 GiB): bytes of KV the store may hold; ``None`` is unlimited.
        block_size (`int`, *optional*, defaults to 16): tokens per block; only whole blocks are cached.
        policy (*optional*, defaults to `LRUPolicy()`): ``policy.choose(candidates) -> node`` picks what to evict.
        store_factory (`Callable[[], KVStore]`, *optional*): how a cached prefix is stored (any
            :class:`~hf_kvplus.storage.base.KVStore`); full precision by default.
        nbits (`int`, *optional*): a packed format instead (8, 4 or 2 bits, see
            :class:`~hf_kvplus.storage.packed.QuantizedStore`). Each block is quantized whole, with
            no full-precision residual; key groups span ``group_size`` tokens of one block.
        group_size (`int`, *optional*): key tokens / value channels per quantization group with ``nbits``;
            must divide ``block_size``. Defaults to ``min(block_size, 64)``: a 16-token block stores keys at
            ``nbits + 2`` bits (scale and zero point per 16 tokens), a 64-token block at ``nbits + 0.5``.

    Example:

    ```python
    >>> store = hf_kvplus.PrefixStore(max_bytes=2**30)
    >>> cache = store.cache_for(model, input_ids)  # already holds the longest cached prefix of input_ids
    >>> out = model.generate(input_ids, cache=cache, max_new_tokens=32)
    >>> store.stats()["tokens_reused"]
    ```
    """

    def bind(self, model_or_config) -> None:
        """Record (first call) or check (later calls) the model this store's KV belongs to."""
        found = model_fingerprint(model_or_config)
        with self._lock:
            if self.fingerprint is None:
                self.fingerprint = found
            else:
                self.fingerprint = check_fingerprint(self.fingerprint, found, "this PrefixStore")

    def cache_for(self, model, input_ids, attention_mask=None, **storage):
        """A cache already holding the longest cached prefix of ``input_ids``, for ``generate`` to continue.

        Args:
            model (`PreTrainedModel`): the model (bound to this store on first use; another model is refused).
            input_ids (`torch.LongTensor`): ``[batch, length]`` (or ``[length]``); rows share the prefix
                they have in common, held once and attended once for all rows (split attention).
            attention_mask (`torch.Tensor`, *optional*): with left padding, nothing is shared.
            **storage: how the request's own tokens are stored (``store_factory=``, ``nbits=``).

        Returns:
            `PrefixSharedCache`: holds whole blocks, never all of ``input_ids`` (one token at least is left to
            prefill); it publishes what it computes, so later requests reuse it.

        Example:

        ```python
        >>> cache = store.cache_for(model, inputs.input_ids)
        >>> cache.get_seq_length()  # tokens generate will not prefill
        >>> out = model.generate(**inputs, cache=cache, max_new_tokens=64)
        ```
        """
        return cache_for(self, model, input_ids, attention_mask=attention_mask, **storage)

    def save(self, path) -> None:
        """Write every cached prefix to one safetensors file (see :mod:`hf_kvplus.prefix.io`)."""
        with self._lock:
            self._drain()
            save_store(self, self._tree, path)

    @classmethod
    def load(cls, path, model_or_config, max_bytes: int | None = None, **kwargs) -> PrefixStore:
        """Read a file written by :meth:`save`, checking it belongs to ``model_or_config``; clear errors otherwise."""
        return load_store(cls, path, model_or_config, max_bytes=max_bytes, **kwargs)


def cache_for(store: PrefixStore, model, input_ids, attention_mask=None, **storage) -> PrefixSharedCache:
    """A :class:`PrefixSharedCache` holding the longest cached prefix of ``input_ids`` shared by every row.

    Never the whole input: at least one token is left for ``generate`` to prefill. Rows that are
    left-padded (per ``attention_mask``) share nothing. See :meth:`PrefixStore.cache_for`.
    """
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids of shape [batch, length >= 1], got {tuple(ids.shape)} {ids.dtype}")
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(model, "config", None), PreTrainedConfig):
        raise TypeError(f"cache_for needs a transformers model, got {type(model).__name__}")
    attach(model, split_attention=True)  # the "kvplus" attention reads the shared prefix without copying it
    store.bind(model)
    limit = ids.shape[1] - 1
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        limit = limit if bool(mask.bool().all()) else 0
    differs = (ids != ids[:1]).any(dim=0).nonzero()
    limit = min(limit, int(differs[0])) if len(differs) else limit
    found = store.acquire(ids[0].tolist(), limit=limit, rows=ids.shape[0])
    cache = PrefixSharedCache(model.config, store=store, **storage)
    if found.length:
        cache.adopt(found, ids[:, : found.length], store)
    return cache


_DEFAULT_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefix_store(model) -> PrefixStore:
    """The model's default :class:`PrefixStore` (1 GiB budget), shared by ``make_cache("prefix", model)`` caches.

    Args:
        model (`PreTrainedModel`): the model whose store is returned (created at the first call).

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("prefix", model)
    >>> hf_kvplus.prefix_store(model).stats()["tokens_reused"]
    ```"""
    if model not in _DEFAULT_STORES:
        store = PrefixStore()
        store.bind(model)
        _DEFAULT_STORES[model] = store
    return _DEFAULT_STORES[model]

register_cache(
    CacheSpec(
        name="prefix",
        factory=PrefixSharedCache,
        description="shared prompt prefixes: held once, reused without copies (RadixAttention / vLLM APC)",
        paper="arXiv:2312.07104",
        from_model=lambda model: {"store": prefix_store(model)},
    )
)
