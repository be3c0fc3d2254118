"""Keys (or values) handed out as parts: shared one-row prefix windows, then the rows' own tokens.

What :meth:`~hf_kvplus.storage.shared.SharedPrefixStore.update` returns while a prefix is shared: a tensor
of the shape the transformers contract asks for, ``[batch, kv_heads, shared + own, head_dim]``, holding no
data of its own. The ``"kvplus"`` attention reads its parts (:mod:`hf_kvplus.cascade`), so the prefix is
never copied. Any other reader (another attention implementation, a user calling ``update``) gets the
concatenation: the first aten op applied to it builds it once (``torch.cat`` of the prefix expanded to the
batch and the own tokens) and runs on that; the result is a plain tensor.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only


class SplitKV(torch.Tensor):
    """``[batch, kv_heads, sum(shared) + own, head_dim]`` as ``shared`` windows (``[1, kv_heads, n_i, head_dim]``,
    read by every row) then ``own`` (``[batch, kv_heads, n, head_dim]``); concatenated only when an op needs it.

    Args:
        shared (`list[torch.Tensor]`): the prefix windows in order, one row each (views of the store's tensors).
        own (`torch.Tensor`): the rows' own tokens, ``[batch, kv_heads, n, head_dim]`` (``n >= 1``).

    Example:

    ```python
    >>> keys = SplitKV([prefix_keys], own_keys)  # [1, 2, 64, 16] and [4, 2, 3, 16]
    >>> keys.shape
    torch.Size([4, 2, 67, 16])
    >>> keys.full() is keys.full()  # built once, on demand; torch ops on `keys` use it
    True
    ```
    """

    shared: list[torch.Tensor]
    own: torch.Tensor
    _full: torch.Tensor | None

    @staticmethod
    def __new__(cls, shared: list[torch.Tensor], own: torch.Tensor):
        batch, heads, n, dim = own.shape
        length = n + sum(part.shape[2] for part in shared)
        return torch.Tensor._make_wrapper_subclass(cls, (batch, heads, length, dim), dtype=own.dtype, device=own.device)

    def __init__(self, shared: list[torch.Tensor], own: torch.Tensor):
        self.shared, self.own, self._full = shared, own, None

    @property
    def shared_length(self) -> int:
        return self.shape[2] - self.own.shape[2]

    def full(self) -> torch.Tensor:
        """The concatenation ``[batch, kv_heads, length, head_dim]`` (built at the first call, then reused)."""
        if self._full is None:
            rows = (self.shape[0], -1, -1, -1)
            self._full = torch.cat([part.expand(rows) for part in self.shared] + [self.own], dim=2)
        return self._full

    def __repr__(self) -> str:  # no data to print without building it
        return f"SplitKV(shape={tuple(self.shape)}, shared={[p.shape[2] for p in self.shared]}, dtype={self.dtype})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = tree_map_only(SplitKV, SplitKV.full, (args, kwargs or {}))
        return func(*args, **kwargs)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a plain tensor (the concatenation of a :class:`SplitKV`)."""
    return tensor.full() if isinstance(tensor, SplitKV) else tensor
