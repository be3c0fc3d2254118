"""Prefix-shared cache: a request reuses the cached KV of its prompt's prefix without copying it.

SGLang RadixAttention (arXiv:2312.07104) and vLLM automatic prefix caching, inside ``model.generate``.
A :class:`PrefixSharedCache` reads the prefix from a :class:`~hf_kvplus.PrefixStore` (views of the
store's tensors, one row for the whole batch), prefills only the rest, and keeps its own tokens in a
private store (copy-on-write). Attention reads the prefix in place: the ``"kvplus"`` attention attends it
once for all rows and merges with the rows' own tokens (:mod:`hf_kvplus.cascade`), so a decoding step
copies no prefix. As it runs, it publishes every whole block it computed (generated tokens included) to
the store, so later requests reuse them without any extra call. Blocks a prefill completed are read from
the store from then on (nothing held twice); blocks completed one token at a time while decoding are
published as copies and read privately until the next prefill, so the shared part of every decoding
step stays the same windows.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from transformers import PreTrainedConfig

from ..config import check_storage_keywords, text_config
from ..eviction.cache import KVPlusCache
from .layer import PrefixContext, PrefixLayer, PrefixLease, trim_storage
from .pool import PrefixPool


class PrefixSharedCache(KVPlusCache):
    """A cache whose prompt prefix is read from a :class:`~hf_kvplus.PrefixStore`, shared without copies.

    Build it with ``store.cache_for(model, input_ids)`` (holds the longest cached prefix already) or
    ``make_cache("prefix", model)`` (empty, shares the model's default store). Either way, every whole
    block the cache computes is published to the store; built directly, it publishes only once
    :func:`hf_kvplus.attach` was called on the model (the hook tells it each forward's token ids).

    Args:
        config (`PreTrainedConfig`): the model's config.
        store (`PrefixStore`, *optional*): where prefixes are shared; ``None`` makes a plain private cache.
        **storage: how the request's own tokens are stored (see :func:`~hf_kvplus.storage.base.make_store_factory`).

    Example:

    ```python
    >>> store = hf_kvplus.PrefixStore(max_bytes=2**30)
    >>> cache = store.cache_for(model, input_ids)
    >>> out = model.generate(input_ids, cache=cache, max_new_tokens=32)
    >>> cache.shared_length  # tokens read from the store (prefix, then this request's published blocks)
    ```
    """

    layer_class = PrefixLayer
    observes_input_ids = True  # hf_kvplus.attach passes the token ids of each forward

    def __init__(self, config: PreTrainedConfig, store: PrefixPool | None = None, **storage):
        if store is not None and not isinstance(store, PrefixPool):
            raise TypeError(f"store must be a hf_kvplus.PrefixStore or None, got {type(store).__name__}")
        check_storage_keywords("PrefixSharedCache", storage, ["store"])
        context = getattr(text_config(config), "max_position_embeddings", None)
        if store is not None and isinstance(context, int) and store.block_size > context:  # degenerate: no whole block
            warnings.warn(
                f"PrefixSharedCache with a store of block_size={store.block_size} shares nothing within the model's "
                f"context (max_position_embeddings={context}): only whole blocks are shared, so it is a private "
                f"DynamicCache. Use a PrefixStore with block_size <= {context}",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(config, **storage)
        self.context = PrefixContext()
        for layer in self.layers:
            layer.context = self.context
        self._store = None if store is None else weakref.ref(store)  # not owned: the cache holds blocks, not the store
        self._lease = PrefixLease()

    @property
    def store(self) -> PrefixPool | None:
        return None if self._store is None else self._store()

    @property
    def shared_length(self) -> int:
        """Tokens read from the store (the same for every layer and every row)."""
        layer = self.layers[0]
        return layer.store.shared_length if layer.is_initialized else 0

    def adopt(self, found, token_ids: torch.Tensor, store: PrefixPool) -> None:
        """Start from a prefix ``found`` by ``store.acquire`` (whose reference this cache now owns)."""
        for layer in self.layers:
            layer.adopt(found.segments, token_ids.shape[0])
        self.context.token_ids = token_ids.detach().to("cpu", torch.long)
        self._lease.release()
        self._lease = PrefixLease(store, found.node_id)

    def predict_nbytes(self, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float32, shared: int = 0) -> int:
        """Bytes held once ``batch`` rows of ``tokens`` tokens ran, the first ``shared`` read from the store.

        The shared prefix is held once (one row, whole blocks only), each row's own tokens privately, plus the
        token ids (``int64``, ``[batch, tokens]``). A prefix cut from a longer cached prompt is a view of that
        prompt's buffer, which :func:`hf_kvplus.cache_nbytes` counts whole (the store holds it anyway); this
        counts the shared tokens only.
        """
        block = self.store.block_size if self.store is not None else 16
        shared = min(shared // block * block, tokens)
        held = [layer.store_factory().predict_nbytes(rows, self.num_kv_heads, n, self.head_dim, dtype)
                for layer in self.layers for rows, n in ((1, shared), (batch, tokens - shared))]
        return sum(held) + 8 * batch * tokens

    # ---------------------------------------------------------------- inputs
    def observe_inputs(self, attention_mask, query_length: int, input_ids: torch.Tensor | None = None) -> None:
        """Padding (see the base) and the token ids about to be appended (from :func:`hf_kvplus.attach`)."""
        super().observe_inputs(attention_mask, query_length)
        if self.shared_length and self.context.padded:
            raise ValueError(
                f"this cache holds a shared prefix of {self.shared_length} tokens, but the attention mask left-pads "
                "some rows: build it with store.cache_for(model, input_ids, attention_mask=mask) so padded rows share nothing"
            )
        context, seen = self.context, self.get_seq_length()
        ids = context.token_ids
        if input_ids is None or not context.ids_known or (ids is not None and ids.shape[1] != seen) or (
            ids is None and seen
        ):
            context.token_ids, context.ids_known = None, False
            return
        new = input_ids.detach().to("cpu", torch.long)
        if ids is not None and ids.shape[0] != new.shape[0] and self.shared_length == seen:
            ids = ids[:1].expand(new.shape[0], -1)  # rows hold only the shared prefix: any batch reads it
        if ids is not None and ids.shape[0] != new.shape[0]:
            raise ValueError(
                f"{type(self).__name__} holds [batch={ids.shape[0]}] rows but received input_ids of shape "
                f"{tuple(input_ids.shape)}: continue with the batch size the cache was filled with"
            )
        context.token_ids = new if ids is None else torch.cat([ids, new], dim=1)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._publish(key_states.shape[-2])
        return keys, values

    # ------------------------------------------------------------- publishing
    def _publish(self, new: int) -> None:
        """Give the store the whole blocks completed by this forward; read rows' common blocks from it afterwards."""
        store, ids, seen = self.store, self.context.token_ids, self.get_seq_length()
        if store is None or ids is None or ids.shape[1] != seen:
            return
        size, shared, batch = store.block_size, self.shared_length, ids.shape[0]
        starts = self.context.pad_host or [0] * batch
        if not any((seen - s) // size > (seen - new - s) // size for s in starts):
            return  # no block completed in this forward
        if not any(starts):
            full = seen // size * size
            differs = (ids[:, shared:full] != ids[:1, shared:full]).any(dim=0).nonzero()
            common = shared + (int(differs[0]) if len(differs) else full - shared) // size * size
            if common > shared:
                self._publish_common(store, ids[0, :common].tolist(), shared, adopt=new > 1)
        if batch > 1 or any(starts):  # rows' own blocks: copies, for later requests (this one keeps its own)
            for row, start in enumerate(starts):
                kv = self._row_kv(row, start, self.shared_length)
                store.insert(ids[row, start:seen].tolist(), kv)

    def _publish_common(self, store: PrefixPool, tokens: list[int], shared: int, adopt: bool) -> None:
        """Insert the rows' common blocks; with ``adopt``, read them from the store from now on."""
        def kv(start: int, stop: int):
            pairs = [layer.store.private_tokens(start - shared, stop - shared) for layer in self.layers]
            return [(trim_storage(k, store.block_size), trim_storage(v, store.block_size)) for k, v in pairs]

        found = store.insert(tokens, kv, acquire=adopt)
        if not adopt:  # a decoding step: the private tokens stay (the private store never writes them in place)
            return
        if found.length <= shared:
            store.release(found.node_id)
            return
        for layer in self.layers:  # read the published blocks from the store from now on
            layer.store.adopt(found.segments)
        self._lease.release()
        self._lease = PrefixLease(store, found.node_id)

    def _row_kv(self, row: int, start: int, shared: int):
        def kv(first: int, stop: int):
            pairs = [layer.store.private_tokens(start + first - shared, start + stop - shared, row) for layer in self.layers]
            return [(k.clone(), v.clone()) for k, v in pairs]  # [1, kv_heads, stop - first, head_dim]

        return kv

    # ------------------------------------------------------------- batch ops
    def crop(self, tokens_to_remove: int) -> None:
        """Roll back tokens; cropping into the shared prefix narrows views (a partial last block is copied)."""
        before = self.shared_length
        super().crop(tokens_to_remove)
        seen, ids = self.get_seq_length(), self.context.token_ids
        if ids is not None:
            self.context.token_ids = ids[:, :seen]
        store, shared = self.store, self.shared_length
        if store is None or shared == before:
            return
        aligned = shared // store.block_size * store.block_size
        if aligned < shared:
            for layer in self.layers:
                layer.store.unshare(aligned)
        if ids is not None:
            found = store.match(ids[0, :aligned].tolist())
            store.acquire_node(found.node_id)
            self._lease.release()
            self._lease = PrefixLease(store, found.node_id)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.context.token_ids is not None:
            self.context.token_ids = self.context.token_ids.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        super().reset()
        self._lease.release()
        self._lease = PrefixLease()

    def release(self) -> None:
        """Drop everything now and give the store its references back (also done when garbage-collected)."""
        self.reset()
