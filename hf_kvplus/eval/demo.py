"""The README's first command: every registered cache on the embedded model and text.

Two tables:

1. every registered cache on the context-compression protocol (prefill ``context`` tokens, score
   the next ``target`` teacher-forced, one window): perplexity, cache MiB after prefill, and greedy
   decode tokens per second right after;
2. streaming: ``stream_tokens`` tokens of the default text fed one token at a time (exact) through
   the sink cache and through a plain sliding window of the same budget: perplexity per 512-token
   window and cache MiB along the way, which stays flat at the budget.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..caches.registry import get_spec, list_caches, make_cache
from ..memory import cache_nbytes
from .perplexity import MIB, _nll, streaming_perplexity
from .report import markdown_table, write_json


@torch.no_grad()
def compare_caches(model, ids, names=None, context=2048, target=256, keep_ratio=0.5, decode_tokens=32) -> list[dict]:
    """One row per cache: ``strategy``, ``settings``, ``ppl``, ``cache_mib``, ``decode_tok_s``."""
    rows = []
    window = ids[: context + target].to(model.device)
    for name in names or list_caches():
        spec = get_spec(name)
        kwargs = {"budget": int(context * keep_ratio)} if spec.evicting else {}
        cache = make_cache(name, model, **kwargs)
        logits = model(window[None, :context], past_key_values=cache, use_cache=True).logits
        held = cache_nbytes(cache)
        rest = model(window[None, context:-1], past_key_values=cache, use_cache=True).logits[0]
        nll = torch.cat([_nll(logits[0, -1:], window[context : context + 1]), _nll(rest, window[context + 1 :])])
        token = rest[-1:].argmax(-1)[None]
        began = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        speed = decode_tokens / (time.perf_counter() - began)
        settings = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "all tokens"
        rows.append(
            {"strategy": name, "settings": settings, "ppl": float(torch.exp(nll.mean())),
             "cache_mib": held / MIB, "decode_tok_s": speed}
        )
    return rows


@torch.no_grad()
def compare_streaming(model, ids, budget=256, stream_tokens=4096, progress=False) -> tuple[list[dict], dict]:
    """Sink cache against a plain sliding window of the same budget, token by token."""
    runs = {}
    for label, name in (("sink (4 sinks + window)", "sink"), ("sliding window (no sinks)", "window")):
        cache = make_cache(name, model, budget=budget)
        runs[label] = streaming_perplexity(model, cache, ids, num_tokens=stream_tokens, chunk_size=1, progress=progress)
    rows = []
    for label, result in runs.items():
        rows.append(
            {"strategy": label, "budget": budget, "tokens_scored": result["tokens_scored"], "ppl": result["ppl"],
             "cache_mib_end": result["cache_bytes"] / MIB, "cache_mib_peak": result["cache_bytes_peak"] / MIB,
             "tok_s": result["tokens_per_second"]}
        )
    return rows, runs


def write_docs_tables(result: dict, folder: str | Path) -> None:
    """Write the demo's tables as Markdown snippets the docs include (``docs/results/``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo_caches.md").write_text(markdown_table(result["caches"]))
    streaming = [{k: v for k, v in row.items() if k != "tok_s"} for row in result["streaming"]]
    (folder / "demo_streaming.md").write_text(markdown_table(streaming) + "\n" + markdown_table(result["streaming_curve"]))


def run_demo(out: str | Path | None = "runs/demo", stream_tokens=4096, budget=256, context=2048, target=256,
             progress=True, model=None, ids=None, docs_dir: str | Path | None = None) -> dict:
    """Run both tables on the embedded defaults (or the given model and token ids); print and save them."""
    from .models import load_default_model, load_default_text, load_default_tokenizer

    started = time.perf_counter()
    if model is None:
        model = load_default_model()
    if ids is None:
        ids = load_default_tokenizer()(load_default_text(), return_tensors="pt").input_ids[0]
    table = compare_caches(model, ids, context=context, target=target)
    print(f"\nEvery registered cache: prefill {context} tokens of the default text, score the next {target} "
          "(teacher-forced, 1 window); evicting caches keep half the context.\n")
    print(markdown_table(table))
    stream_rows, runs = compare_streaming(model, ids, budget=budget, stream_tokens=stream_tokens, progress=progress)
    print(f"Streaming {stream_tokens} tokens one at a time (exact) at a budget of {budget} tokens per layer:\n")
    print(markdown_table(stream_rows))
    curve = [{"tokens": 512 * (i + 1), **{label: r["window_ppl"][i] for label, r in runs.items()},
              "sink cache MiB": runs["sink (4 sinks + window)"]["window_cache_bytes"][i] / MIB}
             for i in range(len(runs["sink (4 sinks + window)"]["window_cache_bytes"]))]
    print("Perplexity of each 512-token window (memory stays flat at the budget):\n")
    print(markdown_table(curve))
    result = {"caches": table, "streaming": stream_rows, "streaming_curve": curve,
              "seconds": time.perf_counter() - started}
    if out is not None:
        out = Path(out)
        write_json(out / "demo.json", result)
        (out / "demo.md").write_text(
            "## Every registered cache\n\n" + markdown_table(table) + "\n## Streaming\n\n" + markdown_table(stream_rows)
            + "\n" + markdown_table(curve)
        )
        print(f"wrote {out / 'demo.json'} and {out / 'demo.md'} ({result['seconds']:.0f} s)")
    if docs_dir is not None:
        write_docs_tables(result, docs_dir)
    return result
