"""State shared by the layers of one cache: padding of each row, the prefill's mask length, shared RoPE angles."""

from __future__ import annotations

import torch


class CacheContext:
    """State shared by the layers of one cache: the left padding of each batch row.

    ``pad_len[b]`` counts the padding columns at the start of row ``b``. ``observed`` tells
    whether the inputs were seen at all (through :func:`hf_kvplus.attach`); without it, an
    evicting cache refuses batches it cannot prove are unpadded.

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("sink", model, budget=256)
    >>> model(input_ids, attention_mask=mask, cache=cache)  # the hook fills cache.context
    >>> cache.context.pad_len  # tensor of left-padding columns per row
    ```
    """

    def __init__(self) -> None:
        self.pad_len: torch.Tensor | None = None  # [batch] long
        self.pad_host: list[int] | None = None  # host copy of `pad_len`, read once with it (never per step)
        self.padded = False  # any(pad_host)
        self.mask_length: int | None = None  # columns of the last 2-D mask read (a decode step adds one real column)
        self.observed = False
        self.awaiting = None  # the EvictingLayer whose attention scores are due
        self.rope_memo = None  # RopeAngles: cos and sin of the sinks' shift, shared by the layers of one step
        self.journal: dict = {}  # layer index -> what it held before this forward (eviction/journal.py)
        self.broken: str | None = None  # why every forward is refused until reset(), after a rollback that was not exact
        self.in_forward = False  # the model hook began this forward and will end it
        self.last_layer: int | None = None  # the journal is dropped after this layer's update when no hook ends the forward
        self.before_forward: dict | None = None  # padding state when the hook began the forward
        self.draft_rows = 0  # draft tokens at the end of this forward (``logits_to_keep - 1``, from the model hook)
        self.attention: str | None = None  # the attention implementation the model ran (or was set up with) last

    def set_padding(self, pad_len: torch.Tensor | None) -> None:
        """Record each row's left padding (``[batch]`` long); reads it on the host once, outside decoding steps."""
        self.pad_len = pad_len
        self.pad_host = None if pad_len is None else pad_len.tolist()
        self.padded = bool(self.pad_host) and any(self.pad_host)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.pad_len is not None:
            self.set_padding(self.pad_len.index_select(0, index.to(self.pad_len.device)))

    _PADDING_FIELDS = ("pad_len", "pad_host", "padded", "mask_length", "observed")

    def begin_forward(self) -> None:
        """Called by the model hook before the forward (and before it reads the call's padding)."""
        self.journal = {}
        self.in_forward = True
        self.before_forward = {name: getattr(self, name) for name in self._PADDING_FIELDS}

    def end_forward(self, failed: bool) -> None:
        """Called by the model hook after the forward, also when it raised: a failed forward is rolled back."""
        from .journal import roll_back

        if failed and self.journal:
            roll_back(self)
        if failed and self.before_forward is not None:
            for name, value in self.before_forward.items():
                setattr(self, name, value)
        self.journal, self.in_forward, self.before_forward = {}, False, None

    def reset(self) -> None:
        self.journal, self.in_forward, self.before_forward = {}, False, None
        self.set_padding(None)
        self.mask_length = None
        self.observed = False
        self.awaiting = None
        self.rope_memo = None
        self.draft_rows = 0
