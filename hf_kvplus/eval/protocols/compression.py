"""``compression``: prefill a context through the cache, score the next tokens teacher-forced (kvpress protocol)."""

from __future__ import annotations

from ..perplexity import compression_perplexity
from . import register_protocol
from .base import Metric, Option, Protocol


@register_protocol
class CompressionProtocol(Protocol):
    """Prefill ``context_length`` tokens through a fresh cache, score the next ``target_length`` teacher-forced,
    then time ``decode_tokens`` greedy steps (:func:`hf_kvplus.eval.compression_perplexity`).

    ``ppl`` is the mean of the windows' perplexities (as kvpress averages samples); ``cache_mib`` is what the
    cache holds after prefill.

    Example:

    ```python
    >>> protocol = get_protocol("compression")
    >>> protocol.run(model, tokenizer, ids, lambda: make_cache("sink", model, budget=512),
    ...              protocol.parse_options({"context_length": 1024}, "example"))["ppl"]
    ```"""

    name = "compression"
    description = ("prefill {context_length} tokens through the cache, then score the next {target_length} "
                   "teacher-forced ({windows} window(s)); decode_tok_s: {decode_tokens} greedy steps right after.")
    options = {
        "context_length": Option(2048, help="tokens prefilled through the cache"),
        "target_length": Option(256, help="tokens scored teacher-forced after the context"),
        "windows": Option(1, help="consecutive windows from the start of the text"),
        "prefill_chunk_size": Option(None, help="prefill in chunks of this many tokens"),
        "decode_tokens": Option(16, "non_negative", help="greedy steps timed after scoring"),
    }
    metrics = (
        Metric("perplexity of the scored tokens (mean over windows)", "", "ppl"),
        Metric("perplexity relative to the dense cache's", "x", "ppl_vs_dense", header="vs dense"),
        Metric("KV cache held after prefill", "MiB", "cache_mib"),
        Metric("memory saved against the dense cache", "share", "memory_saved", header="saved"),
        Metric("greedy decode speed after scoring", "tokens/s", "decode_tok_s"),
        Metric("most KV cache held while prefilling, scoring or decoding", "MiB", "cache_mib_peak", shown=False),
        Metric("perplexity over all scored tokens", "", "ppl_tokens", shown=False),
        Metric("tokens scored", "tokens", "tokens_scored", shown=False),
    )
    quality, memory, keep_ratio_base = "ppl", "cache_mib", "context_length"

    def run(self, model, tokenizer, ids, make_cache, options, progress=False):
        result = compression_perplexity(
            model, make_cache, ids, context_length=options["context_length"], target_length=options["target_length"],
            windows=options["windows"], prefill_chunk_size=options["prefill_chunk_size"],
            decode_tokens=options["decode_tokens"], progress=progress,
        )
        return {"ppl": result["ppl"], "ppl_tokens": result["ppl_tokens"], "cache_bytes": result["cache_bytes"],
                "cache_bytes_peak": result["cache_bytes_peak"], "decode_tok_s": result["decode_tokens_per_second"],
                "tokens_scored": options["target_length"] * options["windows"], "window_ppl": result["window_ppl"]}
