"""Chunked prefill outside ``generate``: a long prompt through an evicting cache at constant memory.

``model.generate(..., prefill_chunk_size=N)`` does this inside generation. :func:`prefill` does it for
everything else (perplexity, serving loops, warming a cache): each chunk of ``chunk_size`` tokens is
one forward, after which the cache evicts back to its budget, so at most ``budget + chunk_size``
tokens are ever held, and the ``"kvplus"`` attention materialises attention probabilities for one
chunk's queries at a time.
"""

from __future__ import annotations

import torch

from ._compat import cache_kwargs
from .validate import check_int


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache, chunk_size: int = 512, attention_mask: torch.Tensor | None = None):
    """Run ``input_ids`` through ``model`` into ``cache``, ``chunk_size`` tokens per forward.

    Args:
        model (`PreTrainedModel`): a causal LM.
        input_ids (`torch.LongTensor`): ``[batch, length]`` (left padded when batched).
        cache (`transformers.Cache`): the cache to fill (it may already hold earlier tokens).
        chunk_size (`int`, *optional*, defaults to 512): tokens per forward.
        attention_mask (`torch.LongTensor`, *optional*): ``[batch, length]`` 2-D padding mask of
            ``input_ids`` (1 = real token); columns of tokens already in ``cache`` are assumed real.

    Returns:
        The model output of the last chunk (``logits`` ``[batch, last_chunk, vocab]``, the last
        position predicts the first new token).

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("h2o", model, budget=512)
    >>> out = hf_kvplus.prefill(model, long_ids, cache, chunk_size=512)
    >>> cache.max_held  # 512, although the prompt has 8,000 tokens
    512
    ```
    """
    check_int("chunk_size", chunk_size)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got {shape}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    past = cache.get_seq_length()
    output = None
    for start in range(0, input_ids.shape[1], chunk_size):
        stop = min(start + chunk_size, input_ids.shape[1])
        mask = None
        if attention_mask is not None:  # the mask of every column so far: [batch, past + stop]
            mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], past), attention_mask[:, :stop]], dim=-1)
        output = model(input_ids[:, start:stop], attention_mask=mask, **cache_kwargs(cache, model), use_cache=True)
    return output
