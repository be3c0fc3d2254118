"""PrefixPool: the cached KV of token-id prefixes, held once and shared by every request that starts with them.

Model-free: token ids in, per-layer ``(keys, values)`` tensors out. The data structure is
:class:`~hf_kvplus.prefix.tree.PrefixTree` (a block radix tree with reference counts and a byte
budget). This class adds what serving needs around it:

* **Locking**: one re-entrant lock guards the tree, the counts and the statistics; every public
  method takes it, so requests in several threads may share a store. Reading cached tensors needs no
  lock: they are never written after insertion. A cache garbage-collected in any thread only queues
  its release (a ``deque``), applied under the lock by the next call, so a finalizer never runs in the
  middle of a tree operation.
* token ids given as lists or tensors, matches at block granularity, statistics.

The model-facing API (``cache_for``, ``save``, ``load``, ``bind``) is :class:`~hf_kvplus.PrefixStore`,
a subclass in :mod:`hf_kvplus.prefix.store`.
"""

from __future__ import annotations

import collections
import threading

import torch

from ..storage.factory import make_store_factory
from ..validate import check_int
from .tree import LRUPolicy, PrefixMatch, PrefixTree


def _token_tuple(tokens) -> tuple[int, ...]:
    """Token ids as a tuple: a sequence of ints, a 1-D tensor or a ``[1, n]`` tensor."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1 or tokens.dtype.is_floating_point:
            raise ValueError(f"expected one sequence of integer token ids, got a {tokens.dtype} tensor {tuple(tokens.shape)}")
        return tuple(tokens.tolist())
    return tuple(int(t) for t in tokens)


class PrefixPool:
    """Cached KV of token-id prefixes, shared without copies by every request that starts with them (model-free).

    Args:
        max_bytes, block_size, policy, store_factory, nbits, group_size: as documented on
            :class:`~hf_kvplus.PrefixStore`, the subclass users build.

    Example:

    ```python
    >>> pool = PrefixPool(max_bytes=2**20, block_size=4)
    >>> kv = lambda start, stop: [(torch.zeros(1, 2, stop - start, 8), torch.zeros(1, 2, stop - start, 8))]
    >>> pool.insert([5, 6, 7, 8, 9], kv).length  # whole blocks only
    4
    >>> found = pool.acquire([5, 6, 7, 8, 1, 2])  # referenced until pool.release(found.node_id)
    >>> found.length, pool.stats()["tokens_reused"]
    (4, 4)
    ```
    """

    def __init__(
        self, max_bytes: int | None = 2**30, block_size: int = 16, policy=None, store_factory=None, nbits=None, group_size=None
    ):
        check_int("max_bytes", max_bytes, allow_none=True)
        check_int("block_size", block_size)
        if policy is not None and not callable(getattr(policy, "choose", None)):
            raise TypeError(f"policy must have a choose(candidates) method, got {type(policy).__name__}")
        if nbits is None:
            if group_size is not None:
                raise ValueError(f"group_size={group_size!r} only applies to packed storage: also pass nbits (8, 4 or 2)")
            factory = make_store_factory(store_factory=store_factory)
        else:
            group_size = min(block_size, 64) if group_size is None else group_size
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or block_size % group_size:
                raise ValueError(f"group_size must be a positive divisor of block_size={block_size}, got {group_size!r}")
            factory = make_store_factory(store_factory=store_factory, nbits=nbits, group_size=group_size, residual_length=0)
        self._tree = PrefixTree(max_bytes, block_size, policy or LRUPolicy(), factory)
        self.fingerprint: dict | None = None  # which model the KV belongs to (bind / load)
        self._lock = threading.RLock()
        self._released: collections.deque[int] = collections.deque()

    @property
    def block_size(self) -> int:
        return self._tree.block_size

    @property
    def max_bytes(self) -> int | None:
        return self._tree.max_bytes

    @property
    def store_factory(self):
        return self._tree.store_factory

    def _drain(self) -> None:
        while self._released:
            self._tree.reference(self._released.popleft(), -1)

    # -------------------------------------------------------------- references
    def match(self, tokens, limit: int | None = None) -> PrefixMatch:
        """The longest cached prefix of ``tokens[:limit]`` (whole blocks), without taking a reference."""
        tokens = _token_tuple(tokens)
        with self._lock:
            self._drain()
            return self._tree.as_match(self._tree.walk(tokens, len(tokens) if limit is None else limit))

    def acquire(self, tokens, limit: int | None = None, rows: int = 1) -> PrefixMatch:
        """Like :meth:`match`, but references the prefix until :meth:`release`; counts a hit or a miss per row."""
        tokens = _token_tuple(tokens)
        with self._lock:
            self._drain()
            found = self._tree.as_match(self._tree.walk(tokens, len(tokens) if limit is None else limit))
            self._tree.counts["hits" if found.length else "misses"] += rows
            self._tree.counts["tokens_reused"] += found.length * rows
            self._tree.reference(found.node_id, +1)
            return found

    def acquire_node(self, node_id: int | None) -> None:
        """One more reference on ``node_id`` (and its ancestors)."""
        with self._lock:
            self._drain()
            self._tree.reference(node_id, +1)

    def release(self, node_id: int | None) -> None:
        """Give back a reference (safe from finalizers and any thread: applied by the next locked call)."""
        if node_id is not None:
            self._released.append(node_id)

    def insert(self, tokens, kv, acquire: bool = False) -> PrefixMatch:
        """Cache the whole blocks of ``tokens``; ``kv(start, stop)`` gives the part not cached yet.

        Args:
            tokens (sequence of `int`): token ids from the first position; a partial last block is ignored.
            kv (`Callable[[int, int], list[tuple[Tensor, Tensor]]]`): per layer ``(keys, values)`` of tokens
                ``[start, stop)``, each ``[1, kv_heads, stop - start, head_dim]``; kept as given (views too).
            acquire (`bool`, defaults to `False`): reference the resulting path (see :meth:`acquire`).

        Returns:
            `PrefixMatch`: what is cached of ``tokens`` afterwards (shorter when the budget refused the rest).
        """
        tokens = _token_tuple(tokens)
        tokens = tokens[: len(tokens) // self.block_size * self.block_size]
        with self._lock:
            self._drain()
            found = self._tree.as_match(self._tree.insert(tokens, kv))
            if acquire:
                self._tree.reference(found.node_id, +1)
            return found

    # ------------------------------------------------------------------ memory
    def clear(self) -> None:
        """Evict every node no request references."""
        with self._lock:
            self._drain()
            while victims := self._tree.evictable():
                for node in victims:
                    self._tree.evict(node)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the store holds (what :func:`hf_kvplus.cache_nbytes` counts)."""
        with self._lock:
            return [t for node in self._tree.nodes.values() for store in node.payload for t in store.tensors()]

    @property
    def nbytes(self) -> int:
        with self._lock:
            self._drain()
            return self._tree.bytes

    def stats(self) -> dict:
        """``hits``/``misses`` (rows of :meth:`acquire`), ``tokens_reused``, ``bytes_held``, ``tokens_held``,
        ``nodes``, ``referenced_nodes``, ``inserted_tokens``, ``evicted_nodes``, ``rejected_inserts``, ``max_bytes``."""
        with self._lock:
            self._drain()
            tree, nodes = self._tree, self._tree.nodes.values()
            names = ("hits", "misses", "tokens_reused", "inserted_tokens", "evicted_nodes", "rejected_inserts")
            return {**{name: tree.counts[name] for name in names}, "bytes_held": tree.bytes,
                    "tokens_held": sum(len(n.tokens) for n in nodes), "nodes": len(tree.nodes),
                    "referenced_nodes": sum(n.refs > 0 for n in nodes), "max_bytes": tree.max_bytes}
