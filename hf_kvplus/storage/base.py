"""Storage for the tokens a cache layer keeps: the "how it is stored" axis.

A store holds keys and values of shape ``[batch, kv_heads, tokens, head_dim]`` in some
representation and can give them back in full precision for attention. Eviction policies only
ever call :meth:`keep`, so any policy runs over any store (sinks over packed int4, for example).
"""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select tokens along dim 2 of ``x`` (``[batch, heads, tokens, ...]``).

    ``index`` is either 1-D (the same tokens for every row and head) or ``[batch, heads, m]``.
    The result always owns exactly the storage it needs.
    """
    if index.dim() == 1:
        return x.index_select(2, index)
    if x.dim() == 3:
        return torch.gather(x, 2, index)
    # Rows of the trailing dims, copied whole: much faster on CPU than gather with an expanded index.
    batch, heads, tokens = x.shape[:3]
    offsets = torch.arange(batch * heads, device=index.device).view(batch, heads, 1) * tokens
    rows = x.reshape(batch * heads * tokens, *x.shape[3:]).index_select(0, (index + offsets).reshape(-1))
    return rows.view(*index.shape, *x.shape[3:])  # [batch, heads, m, ...]


class KVStore:
    """Interface of a storage backend. ``length`` counts the tokens held.

    Tensors are ``[batch, kv_heads, tokens, head_dim]``. ``keep(index)`` keeps the tokens at ``index``
    (``[n]`` for every row and head, or ``[batch, kv_heads, n]``), ``truncate(n)`` drops the newest ``n``,
    ``select_batch(index)`` picks rows, ``tensors()`` lists what is held (counted by ``cache_nbytes``).

    Example (a float16 store for a float32 model):

    ```python
    >>> class HalfStore(KVStore):
    ...     def append(self, keys, values): ...
    ...     def get(self): ...  # float32 keys and values, as attention uses them
    >>> cache = hf_kvplus.make_cache("sink", model, budget=256, store_factory=HalfStore)
    ```"""

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision keys and values, ``[batch, kv_heads, length, head_dim]``."""
        raise NotImplementedError

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append, then return what attention uses now (all tokens, new ones last).

        A lossy store may return the new tokens exactly as given, as long as the tokens and their
        order are those that :meth:`get` will return afterwards.
        """
        self.append(keys, values)
        return self.get()

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the tokens at ``index`` (1-D, or ``[batch, kv_heads, m]``, sorted)."""
        raise NotImplementedError

    def truncate(self, num_tokens: int) -> None:
        """Drop the newest ``num_tokens`` tokens."""
        raise NotImplementedError

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows: ``index`` is a 1-D LongTensor of row indices."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the store holds (for memory accounting)."""
        raise NotImplementedError

    def for_padding(self, pad: list[int], seen: int) -> KVStore:
        """The store to hold a batch whose rows start with ``pad[b]`` padding columns (``seen`` columns so far).

        ``self`` by default; a store whose format depends on where a row's real tokens start returns one
        that aligns to them (packed storage: :class:`~hf_kvplus.storage.packed_rows.RowAlignedStore`).
        """
        return self

    def predict_nbytes(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int | None:
        """Bytes :meth:`tensors` will hold after ``tokens`` tokens were appended (no eviction); ``None``: unknown."""
        return None

    def shared_nbytes(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> dict:
        """``{key: bytes}`` held once per cache by every layer's store (a shared scratch); ``{}``: none."""
        return {}

    @property
    def length(self) -> int:
        raise NotImplementedError


class DenseStore(KVStore):
    """Keys and values in the model's dtype, exactly as attention uses them.

    Example:

    ```python
    >>> store = DenseStore()
    >>> store.append(keys, values)  # [batch, kv_heads, tokens, head_dim]
    >>> store.keep(torch.tensor([0, 2], device=keys.device))  # keep tokens 0 and 2 (or [batch, kv_heads, n] per head)
    >>> store.length
    2
    ```"""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [batch, kv_heads, tokens, head_dim]
        self.values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.keys is None:
            # Own the data: the caller's tensors may be views of larger projections.
            self.keys, self.values = keys.contiguous().clone(), values.contiguous().clone()
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def keep(self, index: torch.Tensor) -> None:
        self.keys = gather_tokens(self.keys, index)
        self.values = gather_tokens(self.values, index)

    def truncate(self, num_tokens: int) -> None:
        if num_tokens > 0:
            keep = self.length - num_tokens
            self.keys = self.keys[:, :, :keep].clone()
            self.values = self.values[:, :, :keep].clone()

    def select_batch(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if t is not None]

    def predict_nbytes(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """Keys and values: ``2 * batch * kv_heads * tokens * head_dim * element_size``."""
        return 2 * batch * kv_heads * tokens * head_dim * dtype.itemsize

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]


class SlotStoreBase(KVStore):
    """What the decoding slot stores share: ``capacity`` slots (budget + 1), one of them free between forwards.

    A layer converts such a store back to a :class:`DenseStore` before anything but a one-token step, so
    ``append``, ``keep`` and ``truncate`` refuse; ``evict_with`` names the method that evicts instead.
    """

    capacity: int
    full: bool  # True between a write and the eviction that follows it
    evict_with = "evict()"

    @property
    def length(self) -> int:
        return self.capacity - (0 if self.full else 1)

    def _refuse(self, what: str):
        raise RuntimeError(f"{type(self).__name__} {what}; convert it to a DenseStore first")

    def append(self, keys, values):
        self._refuse("takes one token per step through write()")

    def keep(self, index):
        self._refuse(f"evicts through {self.evict_with}")

    def truncate(self, num_tokens):
        self._refuse("cannot truncate")
