"""Packed storage for a left-padded batch: one packed store per row, over that row's real tokens only.

KIVI groups keys along tokens and keeps the newest ``residual_length`` tokens exact, so where a group
starts and which tokens are still exact depend on how many real tokens a row holds. In one packed
store for the whole batch, the groups of a padded row would start at its padding and padding would
enter their min/max: the row would decode differently than alone. Here each row's tokens go to their
own :class:`~hf_kvplus.storage.packed.QuantizedStore`, which sees exactly the calls (appends, keeps,
truncations) that the row alone would give it, so a padded row gets exactly what it gets alone.
Padding columns still held come back as zeros (the attention mask hides them).

A padded batch is held this way from its first token (:meth:`QuantizedStore.for_padding`); the decoding
step then runs per row (the eager path), not the shared-scratch hot path of an unpadded batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .base import KVStore


class RowAlignedStore(KVStore):
    """Packed keys and values of a left-padded batch, each row in its own store of its real tokens.

    Args:
        make_row (`Callable[[], KVStore]`): a fresh store for one row (a ``QuantizedStore`` of batch 1).
        padding (`list[int]`): padding columns still to arrive at the start of each row.

    Tensors in and out are ``[batch, kv_heads, tokens, head_dim]``; row ``b`` holds ``pad_held[b]`` padding
    columns (returned as zeros) before its real tokens, and every row holds the same number of columns.

    Example:

    ```python
    >>> store = RowAlignedStore(lambda: QuantizedStore(nbits=4, group_size=2, residual_length=0), [0, 1])
    >>> keys, values = store.update(k, v)  # [2, kv_heads, 4, head_dim]: row 1's first column is padding
    ```
    """

    def __init__(self, make_row: Callable[[], KVStore], padding: list[int]):
        self.rows = [make_row() for _ in padding]
        self.pad_to_come = list(padding)
        self.pad_held = [0] * len(padding)
        self._like: torch.Tensor | None = None  # an empty tensor of the model's dtype and device

    def for_padding(self, pad: list[int], seen: int) -> KVStore:
        return self

    @property
    def length(self) -> int:
        return 0 if not self.rows else self.pad_held[0] + self.rows[0].length

    def _split(self, keys: torch.Tensor, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each row's real tokens of a chunk (``[1, kv_heads, real, head_dim]``), counting the padding it starts with."""
        if keys.shape[0] != len(self.rows):
            raise ValueError(
                f"this store holds {len(self.rows)} rows but received keys of shape {tuple(keys.shape)}"
            )
        self._like = keys.new_empty(0)
        self._dims = keys.shape[1], keys.shape[3]  # kv_heads, head_dim
        parts = []
        for b in range(len(self.rows)):
            pad = min(self.pad_to_come[b], keys.shape[2])
            self.pad_to_come[b] -= pad
            self.pad_held[b] += pad
            parts.append((keys[b : b + 1, :, pad:], values[b : b + 1, :, pad:]))
        return parts

    def _assemble(self, parts: list, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, kv_heads, length, head_dim]`` keys and values: zeros for padding, then each row's tokens."""
        keys = self._like.new_zeros(len(self.rows), *shape)  # [b, h, length, d]
        values = torch.zeros_like(keys)
        for b, part in enumerate(parts):
            if part is not None:
                real = part[0].shape[2]
                keys[b : b + 1, :, keys.shape[2] - real :] = part[0]
                values[b : b + 1, :, keys.shape[2] - real :] = part[1]
        return keys, values

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for row, (k, v) in zip(self.rows, self._split(keys, values), strict=True):
            if k.shape[2]:
                row.append(k, v)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for row, (k, v) in zip(self.rows, self._split(keys, values), strict=True):
            parts.append(row.update(k, v) if k.shape[2] else row.get() if row.length else None)
        return self._assemble(parts, (keys.shape[1], self.length, keys.shape[3]))

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [row.get() if row.length else None for row in self.rows]
        heads, head_dim = self._dims  # rows holding only padding (or nothing) come back as zeros
        return self._assemble(parts, (heads, self.length, head_dim))

    def keep(self, index: torch.Tensor) -> None:
        """Keep the columns at ``index`` (``[m]`` or ``[batch, kv_heads, m]``, sorted); padding goes before real tokens."""
        for b, row in enumerate(self.rows):
            pad = self.pad_held[b]
            rows_index = index if index.dim() == 1 else index[b]  # [m] or [kv_heads, m]
            kept_pad = (rows_index < pad).sum(dim=-1)
            if index.dim() == 1:
                kept = int(kept_pad)
            else:
                kept = int(kept_pad.max())
                if int(kept_pad.min()) != kept:
                    raise RuntimeError(
                        f"row {b}: heads keep different numbers of padding columns ({kept_pad.tolist()})"
                    )
            real = rows_index[..., kept:] - pad
            self.pad_held[b] = kept
            if real.shape[-1] < row.length:  # sorted and unique: fewer means some real token goes
                row.keep(real if index.dim() == 1 else real.unsqueeze(0))

    def truncate(self, num_tokens: int) -> None:
        for b, row in enumerate(self.rows):
            real = min(num_tokens, row.length)
            if real:
                row.truncate(real)
            self.pad_held[b] -= num_tokens - real

    def select_batch(self, index: torch.Tensor) -> None:
        chosen, rows = set(), []
        for i in index.tolist():
            rows.append(self.rows[i] if i not in chosen else copy.deepcopy(self.rows[i]))
            chosen.add(i)
        self.rows = rows
        self.pad_to_come = [self.pad_to_come[i] for i in index.tolist()]
        self.pad_held = [self.pad_held[i] for i in index.tolist()]

    def tensors(self) -> list[torch.Tensor]:
        return [t for row in self.rows for t in row.tensors()]
