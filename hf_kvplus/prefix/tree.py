"""The radix tree behind :class:`~hf_kvplus.PrefixStore`: a plain data structure, no model, no locking.

Token ids at block granularity (SGLang RadixAttention, arXiv:2312.07104; vLLM automatic prefix
caching). A node's edge is a run of whole blocks; its KV is a window ``[start, start + len(edge))``
onto one :class:`~hf_kvplus.storage.base.KVStore` per layer (the ``payload``). Splitting a node gives
both halves windows onto the same stores, so nothing is ever copied.

* References: a request holds its deepest node; the count is taken on that node and every ancestor,
  and a referenced node is never evicted.
* Bytes are counted per distinct tensor storage (a storage shared by split nodes counts once) and never
  exceed ``max_bytes``: unreferenced leaves are evicted in the policy's order, else the insert is refused.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..storage.base import DenseStore, KVStore


class LRUPolicy:
    """Eviction policy: the least recently used candidate goes first. Any object with ``choose`` works.

    ``choose(candidates)`` receives the unreferenced leaf nodes (:class:`PrefixNode`: ``tokens``,
    ``last_used``, a tick of the store's clock, ``refs``) and returns the one to evict.

    Example:

    ```python
    >>> store = hf_kvplus.PrefixStore(max_bytes=2**28, policy=hf_kvplus.LRUPolicy())
    ```"""

    def choose(self, candidates: list[PrefixNode]) -> PrefixNode:
        return min(candidates, key=lambda node: node.last_used)


@dataclass(eq=False)
class PrefixNode:
    """One edge: ``tokens`` (whole blocks) whose KV is the window at ``start`` of ``payload`` (one store per layer)."""

    id: int
    tokens: tuple[int, ...]
    parent: PrefixNode | None
    payload: list[KVStore]
    start: int = 0
    children: dict[tuple[int, ...], PrefixNode] = field(default_factory=dict)  # first block -> child
    refs: int = 0
    last_used: int = 0


@dataclass
class PrefixMatch:
    """A cached prefix: ``length`` tokens as ``(payload, start, stop)`` windows in order; ``node_id`` is the deepest node."""

    length: int = 0
    node_id: int | None = None
    segments: list[tuple[list[KVStore], int, int]] = field(default_factory=list)


def storage_bytes(payload: list[KVStore]) -> dict[int, int]:
    """``{storage data_ptr: nbytes}`` of every tensor a payload holds."""
    found = {}
    for store in payload:
        for tensor in store.tensors():
            storage = tensor.untyped_storage()
            if storage.nbytes():
                found[storage.data_ptr()] = storage.nbytes()
    return found


class PrefixTree:
    """Token-block radix tree with reference counts and a byte budget (see the module docstring)."""

    def __init__(self, max_bytes: int | None, block_size: int, policy, store_factory: Callable[[], KVStore]):
        self.max_bytes, self.block_size, self.policy, self.store_factory = max_bytes, block_size, policy, store_factory
        self.geometry: tuple | None = None  # (layers, kv_heads, head_dim, dtype) of what is held
        self.root = PrefixNode(id=0, tokens=(), parent=None, payload=[])
        self.nodes: dict[int, PrefixNode] = {}
        self.storage_refs: dict[int, list[int]] = {}  # data_ptr -> [nbytes, nodes holding it]
        self.bytes = self.clock = 0
        self.next_id = 1
        self.counts = collections.Counter()

    def walk(self, tokens: tuple[int, ...], limit: int) -> list[tuple[PrefixNode, int]]:
        """``(node, tokens used)`` along the longest cached whole-block prefix of ``tokens[:limit]``."""
        path, node, pos, size = [], self.root, 0, self.block_size
        while pos + size <= limit:
            child = node.children.get(tokens[pos : pos + size])
            if child is None:
                break
            used = size
            while used < len(child.tokens) and pos + used + size <= limit and (
                child.tokens[used : used + size] == tokens[pos + used : pos + used + size]
            ):
                used += size
            path.append((child, used))
            pos += used
            if used < len(child.tokens):
                break
            node = child
        return path

    def as_match(self, path: list[tuple[PrefixNode, int]]) -> PrefixMatch:
        """The windows of a path; marks its nodes as just used."""
        self.clock += 1
        for node, _ in path:
            node.last_used = self.clock
        segments = [(node.payload, node.start, node.start + used) for node, used in path]
        return PrefixMatch(sum(used for _, used in path), path[-1][0].id if path else None, segments)

    def reference(self, node_id: int | None, delta: int) -> None:
        """Add ``delta`` to the count of ``node_id`` and of each ancestor."""
        node = self.nodes.get(node_id) if node_id is not None else None
        if node_id is not None and node is None:
            raise RuntimeError(f"PrefixStore: node {node_id} is referenced but no longer cached")
        chain = []
        while node is not None and node is not self.root:
            chain.append(node)
            node = node.parent
        if any(n.refs + delta < 0 for n in chain):  # checked first: a bad release changes nothing
            raise RuntimeError(f"PrefixStore: node {node_id} released more often than acquired")
        for n in chain:
            n.refs += delta

    def insert(self, tokens: tuple[int, ...], kv: Callable) -> list[tuple[PrefixNode, int]]:
        """Cache ``tokens`` (whole blocks); ``kv(start, stop)`` is asked for the part not cached yet. Returns the path."""
        path = self.walk(tokens, len(tokens))
        if path and path[-1][1] < len(path[-1][0].tokens):
            path[-1] = (self._split(*path[-1]), path[-1][1])
        cached = sum(used for _, used in path)
        if cached < len(tokens):
            node = self.add(path[-1][0] if path else self.root, tokens[cached:], kv(cached, len(tokens)))
            if node is not None:
                path.append((node, len(tokens) - cached))
        return path

    def _split(self, node: PrefixNode, used: int) -> PrefixNode:
        """Cut ``node`` after ``used`` tokens; returns the new head (both halves share the payload)."""
        head = PrefixNode(self._new_id(), node.tokens[:used], node.parent, node.payload, node.start,
                          refs=node.refs, last_used=node.last_used)
        node.parent.children[head.tokens[: self.block_size]] = head
        node.tokens, node.start, node.parent = node.tokens[used:], node.start + used, head
        head.children[node.tokens[: self.block_size]] = node
        self.nodes[head.id] = head
        self._hold(head.payload, +1)
        return head

    def add(self, parent: PrefixNode, tokens: tuple[int, ...], kv: list) -> PrefixNode | None:
        """A new child of ``parent`` (``kv``: per layer ``[1, kv_heads, len(tokens), head_dim]``); ``None`` if it cannot fit."""
        self._check_kv(kv, len(tokens))
        payload = [self._wrap(keys, values) for keys, values in kv]
        protect = parent.id if parent is not self.root else None
        self.reference(protect, +1)  # making room must not evict the node we attach to
        try:
            if not self._make_room(payload):
                self.counts["rejected_inserts"] += 1
                return None
        finally:
            self.reference(protect, -1)
        node = PrefixNode(self._new_id(), tokens, parent, payload)
        parent.children[tokens[: self.block_size]] = node
        self.nodes[node.id] = node
        self._hold(payload, +1)
        self.counts["inserted_tokens"] += len(tokens)
        return node

    def _wrap(self, keys: torch.Tensor, values: torch.Tensor) -> KVStore:
        if self.store_factory is DenseStore:  # hold the tensors as they are: no copy
            store = DenseStore()
            store.keys, store.values = keys, values
            return store
        store = self.store_factory()
        store.append(keys, values)
        return store

    def _check_kv(self, kv: list, length: int) -> None:
        if not kv:
            raise ValueError("kv() gave no layers")
        keys = kv[0][0]
        for k, v in kv:
            if k.dim() != 4 or k.shape[0] != 1 or k.shape[2] != length or v.shape != k.shape:
                raise ValueError(f"kv() must give [1, kv_heads, {length}, head_dim] keys and values, got "
                                 f"{tuple(k.shape)} and {tuple(v.shape)}")
            if k.shape != keys.shape or k.dtype != keys.dtype or v.dtype != keys.dtype:
                raise ValueError("kv() gave layers of different shapes or dtypes")
        geometry = (len(kv), keys.shape[1], keys.shape[3], keys.dtype)
        if self.geometry is None:
            self.geometry = geometry
        elif geometry != self.geometry:
            raise ValueError(f"this PrefixStore holds KV of (layers, kv_heads, head_dim, dtype)={self.geometry}, "
                             f"got {geometry}: use one store per model")

    def _hold(self, payload: list[KVStore], delta: int) -> None:
        for ptr, nbytes in storage_bytes(payload).items():
            entry = self.storage_refs.setdefault(ptr, [nbytes, 0])
            if entry[1] == 0:
                self.bytes += nbytes
            entry[1] += delta
            if entry[1] == 0:
                self.bytes -= nbytes
                del self.storage_refs[ptr]

    def _make_room(self, payload: list[KVStore]) -> bool:
        while True:
            need = sum(n for ptr, n in storage_bytes(payload).items() if ptr not in self.storage_refs)
            if self.max_bytes is None or self.bytes + need <= self.max_bytes:
                return True
            candidates = self.evictable()
            if need > self.max_bytes or not candidates:
                return False
            self.evict(self.policy.choose(candidates))

    def evictable(self) -> list[PrefixNode]:
        """Leaves no request references."""
        return [node for node in self.nodes.values() if not node.children and node.refs == 0]

    def evict(self, node: PrefixNode) -> None:
        del node.parent.children[node.tokens[: self.block_size]]
        del self.nodes[node.id]
        self._hold(node.payload, -1)
        self.counts["evicted_nodes"] += 1

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1
