"""``streaming``: feed the text through one cache and score every next token (StreamingLLM protocol)."""

from __future__ import annotations

from ..perplexity import streaming_perplexity
from ..tables import markdown_table
from . import register_protocol
from .base import Metric, Option, Protocol


@register_protocol
class StreamingProtocol(Protocol):
    """Feed ``num_tokens`` tokens through one cache, scoring every next token
    (:func:`hf_kvplus.eval.streaming_perplexity`); ``chunk_size`` 1 is exact, more is a faster approximation and
    the row says ``exact: False`` (a dense cache never evicts, so it is exact at any chunk size). The summary adds
    each ``report_every`` window's perplexity and cache MiB.

    Example:

    ```python
    >>> protocol = get_protocol("streaming")
    >>> protocol.run(model, tokenizer, ids, lambda: make_cache("sink", model, budget=256),
    ...              protocol.parse_options({"num_tokens": 4096}, "example"))["ppl"]
    ```"""

    name = "streaming"
    description = ("feed {num_tokens} tokens through one cache, scoring every next token, {chunk_size} token(s) per "
                   "forward (1 is exact; more is an approximation unless the cache keeps every token).")
    options = {
        "num_tokens": Option(4096, help="tokens streamed"),
        "chunk_size": Option(1, help="tokens per forward (1 is exact)"),
        "report_every": Option(512, help="tokens per window of the curves"),
    }
    metrics = (
        Metric("tokens scored", "tokens", "tokens_scored"),
        Metric("tokens per forward", "tokens", "chunk_size"),
        Metric("every token scored with exactly the cache it would see one at a time", "", "exact"),
        Metric("perplexity of every next token", "", "ppl"),
        Metric("perplexity relative to the dense cache's", "x", "ppl_vs_dense", header="vs dense"),
        Metric("KV cache held at the end of the text", "MiB", "cache_mib"),
        Metric("most KV cache held after any forward", "MiB", "cache_mib_peak"),
        Metric("tokens streamed per second (exact runs only)", "tokens/s", "decode_tok_s"),
        Metric("memory saved against the dense cache", "share", "memory_saved", shown=False),
    )
    quality, memory = "ppl", "cache_mib"

    def run(self, model, tokenizer, ids, make_cache, options, progress=False):
        result = streaming_perplexity(model, make_cache(), ids, num_tokens=options["num_tokens"],
                                      chunk_size=options["chunk_size"], report_every=options["report_every"],
                                      progress=progress)
        return {"ppl": result["ppl"], "cache_bytes": result["cache_bytes"], "cache_bytes_peak": result["cache_bytes_peak"],
                "decode_tok_s": result["tokens_per_second"] if result["exact"] else None,
                "tokens_scored": result["tokens_scored"], "chunk_size": result["chunk_size"], "exact": result["exact"],
                "window_ppl": result["window_ppl"], "window_cache_bytes": result["window_cache_bytes"]}

    def finish(self, rows, point):
        if point.strategy == "dynamic":  # a dense cache never evicts: chunks score exactly the same tokens
            for row in rows:
                row["exact"] = True
        return rows

    def summary(self, experiment, rows, folder=None):
        every = experiment.options["report_every"]
        curves = [r for r in rows if r.get("window_ppl") and r.get("window_cache_mib")]
        table = []
        for i in range(max((len(r["window_ppl"]) for r in curves), default=0)):
            line = {"tokens": every * (i + 1)}
            for r in curves:
                label = f"{r['strategy']} {r['settings']}".replace(", ", " ")
                if i < len(r["window_ppl"]):
                    line[f"{label} ppl"] = r["window_ppl"][i]
                    line[f"{label} MiB"] = r["window_cache_mib"][i]
            table.append(line)
        return [f"Perplexity and cache MiB of each {every}-token window:\n", markdown_table(table)]
