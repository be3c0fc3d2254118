"""``passkey``: hide a pass key in the text and ask for it back through the cache (exact match)."""

from __future__ import annotations

from ..passkey import passkey_retrieval
from . import register_protocol
from .base import Metric, Option, Protocol


@register_protocol
class PasskeyProtocol(Protocol):
    """Hide a 5-digit pass key at each depth of ``samples`` windows of the text and ask for it back; the model
    answers greedily through the cache and the first number of its answer is scored with exact match
    (:func:`hf_kvplus.eval.passkey_retrieval`). ``ppl`` is the key's perplexity, teacher-forced.

    Example:

    ```python
    >>> protocol = get_protocol("passkey")
    >>> protocol.run(model, tokenizer, ids, lambda: make_cache("sink", model, budget=256),
    ...              protocol.parse_options({}, "example"))["exact_match"]
    ```"""

    name = "passkey"
    description = ("hide a 5-digit pass key at depths {depths} of a {context_length}-token text ({samples} sample(s) "
                   "per depth), ask for it back; exact_match is the share of keys returned exactly (greedy).")
    options = {
        "context_length": Option(1024, help="prompt tokens (text, key and question)"),
        "depths": Option([0.1, 0.5, 0.9], "ratios", help="where the key sits (0 start, 1 end)"),
        "samples": Option(2, help="windows of text per depth"),
        "seed": Option(0, "non_negative", help="seeds the keys"),
    }
    metrics = (
        Metric("share of keys returned exactly (greedy)", "fraction", "exact_match"),
        Metric("perplexity of the key's tokens, teacher-forced", "", "ppl"),
        Metric("KV cache held after the prompt", "MiB", "cache_mib"),
        Metric("memory saved against the dense cache", "share", "memory_saved", header="saved"),
        Metric("perplexity relative to the dense cache's", "x", "ppl_vs_dense", shown=False),
        Metric("most KV cache held while answering", "MiB", "cache_mib_peak", shown=False),
    )
    quality, memory, keep_ratio_base = "ppl", "cache_mib", "context_length"

    def run(self, model, tokenizer, ids, make_cache, options, progress=False):
        return passkey_retrieval(model, tokenizer, ids, make_cache, **options, progress=progress)
