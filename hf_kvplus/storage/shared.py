"""A layer's storage when part of it is shared: read-only prefix windows plus the request's own tokens.

The prefix is a list of windows ``(payload, start, stop)`` onto stores owned by a
:class:`~hf_kvplus.PrefixStore`; it has one row, which every batch row reads. New tokens go to a private
store (copy-on-write: shared tensors are never written). Cropping into the prefix only narrows the windows.

``update`` returns the keys and values as :class:`~hf_kvplus.storage.split.SplitKV`: the prefix windows
and the private tokens, not concatenated. The ``"kvplus"`` attention reads the parts (the prefix once for
the whole batch, :mod:`hf_kvplus.cascade`); any other reader gets the concatenation, built on its first op.
"""

from __future__ import annotations

import torch

from .base import KVStore
from .split import SplitKV

Segment = tuple  # (payload: list[KVStore], start: int, stop: int)


class SharedPrefixStore(KVStore):
    """Shared prefix windows of one layer, then a private :class:`KVStore`.

    Args:
        layer_idx (`int`): which store of each payload belongs to this layer.
        segments (`list[tuple[list[KVStore], int, int]]`): the shared prefix, in order.
        factory (`Callable[[], KVStore]`): makes the private store of this request's own tokens,
            ``[batch, kv_heads, n, head_dim]``.
        batch_size (`int`, defaults to 1): rows that read the prefix.

    Example:

    ```python
    >>> store = SharedPrefixStore(0, match.segments, DenseStore, batch_size=4)
    >>> store.append(keys, values)  # [4, kv_heads, new, head_dim]
    >>> keys, values = store.get()  # [4, kv_heads, match.length + new, head_dim]
    ```
    """

    def __init__(self, layer_idx: int, segments: list[Segment], factory, batch_size: int = 1):
        self.layer_idx = layer_idx
        self.segments = list(segments)
        self.factory = factory
        self.private = factory()
        self.batch_size = batch_size

    @property
    def shared_length(self) -> int:
        return sum(stop - start for _, start, stop in self.segments)

    @property
    def length(self) -> int:
        return self.shared_length + self.private.length

    def shared(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix windows as ``(keys, values)`` views, each ``[1, kv_heads, stop - start, head_dim]``.

        Adjacent windows onto the same payload (the halves of a split tree node) come as one view.
        """
        runs = []
        for payload, start, stop in self.segments:
            if runs and runs[-1][0] is payload and runs[-1][2] == start:
                runs[-1][2] = stop
            else:
                runs.append([payload, start, stop])
        out = []
        for payload, start, stop in runs:
            keys, values = payload[self.layer_idx].get()
            out.append((keys[:, :, start:stop], values[:, :, start:stop]))
        return out

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.private.length == 0:  # the prefix fits any batch until rows hold their own tokens
            self.private, self.batch_size = self.factory(), keys.shape[0]
        self.private.append(keys, values)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append, then return every token as :class:`SplitKV` parts (``[batch, kv_heads, length, head_dim]``).

        Plain tensors (:meth:`get`) without a prefix, while autograd records (the parts carry no gradient)
        and inside ``torch.compile`` (dynamo does not trace the wrapper).
        """
        self.append(keys, values)
        if not self.segments or torch.compiler.is_compiling() or (torch.is_grad_enabled() and keys.requires_grad):
            return self.get()
        own_keys, own_values = self.private.get()  # [batch, kv_heads, n, head_dim]
        shared = self.shared()
        return SplitKV([k for k, _ in shared], own_keys), SplitKV([v for _, v in shared], own_values)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token as plain tensors, ``[batch, kv_heads, length, head_dim]``: a copy of the prefix per row."""
        if not self.segments:
            return self.private.get()
        shape, shared = (self.batch_size, -1, -1, -1), self.shared()
        keys = [k.expand(shape) for k, _ in shared]  # [batch, kv_heads, n_i, head_dim], stride 0 on batch
        values = [v.expand(shape) for _, v in shared]
        if self.private.length:
            own_keys, own_values = self.private.get()
            keys.append(own_keys)
            values.append(own_values)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)  # [batch, kv_heads, length, head_dim]

    def private_tokens(self, start: int, stop: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of private tokens ``[start, stop)`` of one row, ``[1, kv_heads, stop - start, head_dim]``."""
        keys, values = self.private.get()
        return keys[row : row + 1, :, start:stop], values[row : row + 1, :, start:stop]

    def adopt(self, segments: list[Segment]) -> None:
        """Replace the prefix by ``segments`` (longer or equal), dropping the private tokens they now cover."""
        covered = sum(stop - start for _, start, stop in segments) - self.shared_length
        if covered < 0 or covered > self.private.length:
            raise ValueError(f"cannot adopt a prefix covering {covered} private tokens of {self.private.length}")
        if covered:
            remaining = torch.arange(covered, self.private.length, device=self.private.get()[0].device)
            self.private.keep(remaining)
        self.segments = list(segments)

    def unshare(self, length: int) -> None:
        """Keep ``length`` shared tokens and copy the rest of the prefix into the (empty) private store."""
        if self.private.length:
            raise ValueError("unshare() needs an empty private store: truncate the private tokens first")
        tail, pos = [], 0
        for keys, values in self.shared():  # the windows' parts beyond `length`, [1, kv_heads, n, head_dim]
            skip = max(0, length - pos)
            if skip < keys.shape[2]:
                tail.append((keys[:, :, skip:], values[:, :, skip:]))
            pos += keys.shape[2]
        self.truncate(self.shared_length - length)
        self.private = self.factory()
        if tail:
            shape = (self.batch_size, -1, -1, -1)
            keys, values = (torch.cat(parts, dim=-2).expand(shape).contiguous() for parts in zip(*tail, strict=True))
            self.private.append(keys, values)  # [batch, kv_heads, shared - length, head_dim]

    def keep(self, index: torch.Tensor) -> None:
        raise ValueError("a prefix-shared cache never evicts tokens (its budget is None): shared prefixes are read-only")

    def truncate(self, num_tokens: int) -> None:
        """Drop the newest tokens: private ones first, then narrow the shared windows (views, never writes)."""
        own = min(num_tokens, self.private.length)
        if own:
            self.private.truncate(own)
        drop = num_tokens - own
        while drop > 0 and self.segments:
            payload, start, stop = self.segments.pop()
            cut = min(drop, stop - start)
            if stop - cut > start:
                self.segments.append((payload, start, stop - cut))
            drop -= cut

    def select_batch(self, index: torch.Tensor) -> None:
        self.private.select_batch(index)
        self.batch_size = index.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        shared = [t for payload, _, _ in self.segments for t in payload[self.layer_idx].tensors()]
        return shared + list(self.private.tensors())
