"""Quantized KV caches side by side: hf_kvplus int8/int4/int2 against transformers' QuantizedCache.

Protocol (issue 3), on the embedded defaults (SmolLM2-135M-Instruct, fp32, CPU, ``pydoc_data.topics``):

* perplexity, two protocols, 3 consecutive windows each (``ppl`` is the mean of the windows' perplexities):
  ``ppl``: prefill 2048 context tokens through the cache, then score the next 256 teacher-forced in one
  forward (the kvpress protocol, ``hf_kvplus.eval.compression_perplexity``: the 256 see each other exactly);
  ``ppl_decode``: the same 2048, then the 256 fed one token per forward, as decoding does (each step through
  the cache's decoding path; tokens leave the residual and are quantized while being scored);
* bits per element, exact, from the tensors held after the 2048-token prefill: ``history_bits`` counts the
  quantized history (codes, scales, zero points, group maps) and the full-precision sinks over the key and
  value elements they hold; ``bits_all`` counts every byte the cache holds (``hf_kvplus.cache_nbytes``: the
  history's buffers with their spare capacity, the full-precision residual window, sinks, a rotation matrix)
  over all ``2 * layers * kv_heads * 2048 * head_dim`` elements;
* cache bytes after the 2048-token prefill relative to a bf16 dense cache of the same tokens;
* decode step time at 2k context: median over interleaved rounds of single-token forwards, all
  caches in this process, relative to the dense fp32 ``DynamicCache``.

Run from the repository root (about 25 minutes on 2 CPU cores):

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/quantized.py

It prints the table and writes ``benchmarks/results/quantized.json`` and ``quantized.md``, and
refreshes the table in ``docs/strategies/quantized.md`` between its ``benchmark`` markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, QuantizedCache

import hf_kvplus
from hf_kvplus._compat import cache_kwargs, quantized_layer_history
from hf_kvplus.eval import (
    compression_perplexity,
    load_default_model,
    load_default_text,
    load_default_tokenizer,
)
from hf_kvplus.eval.report import markdown_table, write_json
from hf_kvplus.memory import cache_nbytes, held_tensors, kv_bytes_per_token

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["cache", "bits", "ppl", "ppl_vs_dense_%", "ppl_decode", "decode_vs_dense_%", "history_bits", "bits_all",
           "bytes_vs_bf16", "step_ms", "step_vs_dense"]
#: hf_kvplus rows: label -> (bits label, mean code bits, registered name, keywords).
OURS = {
    "hf_kvplus int8": ("K8V8", 8, "int8", {}),
    "hf_kvplus int4": ("K4V4", 4, "int4", {}),
    "hf_kvplus int2": ("K2V2", 2, "int2", {}),
    "hf_kvplus k4v2": ("K4V2", 3, "k4v2", {}),
    "hf_kvplus int2r (Hadamard keys, 4 sinks)": ("K2V2", 2, "int2r", {}),
    "hf_kvplus int2rp (Hadamard keys before RoPE, 4 sinks)": ("K2V2", 2, "int2rp", {}),
}


def candidates(model) -> dict:
    """Label -> ``(nbits, make_cache)``; transformers' quanto backend supports only 2 and 4 bits."""
    rows = {"dense fp32 (DynamicCache)": (("fp32", 32), lambda: DynamicCache(config=model.config))}
    for label, (bits, mean, name, kwargs) in OURS.items():
        rows[label] = ((bits, mean), lambda name=name, kwargs=kwargs: hf_kvplus.make_cache(name, model, **kwargs))
    for nbits in (4, 2):
        rows[f"transformers QuantizedCache quanto int{nbits}"] = (
            (f"K{nbits}V{nbits}", nbits),
            lambda nbits=nbits: QuantizedCache(backend="quanto", config=model.config, nbits=nbits),
        )
    return rows


def all_bits(cache, config, tokens: int) -> float:
    """Bits per key/value element of everything the cache holds (``cache_nbytes``) after ``tokens`` tokens."""
    elements = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * tokens
    return 8 * cache_nbytes(cache) / elements


@torch.no_grad()
def decode_perplexity(model, make, ids: torch.Tensor, context: int, target: int, windows: int) -> dict:
    """Prefill ``context`` tokens, then feed the ``target`` next ones one per forward, scoring each (mean of the
    windows' perplexities, as ``compression_perplexity``)."""
    from hf_kvplus.eval.perplexity import window_starts

    window_ppl = []
    for start in window_starts(ids.numel(), context + target, windows):
        window = ids[start : start + context + target]
        cache = make()
        logits = model(window[None, :context], **cache_kwargs(cache), use_cache=True).logits[0, -1:]  # [1, vocab]
        nll = []
        for i in range(target):
            nll.append(torch.nn.functional.cross_entropy(logits.float(), window[context + i : context + i + 1]))
            if i + 1 < target:
                logits = model(window[None, context + i : context + i + 1], **cache_kwargs(cache),
                               use_cache=True).logits[0, -1:]
        window_ppl.append(float(torch.exp(torch.stack(nll).mean())))
    return {"ppl": sum(window_ppl) / len(window_ppl), "window_ppl": window_ppl}


def history_bits(cache) -> float | None:
    """Bits per quantized key/value element held, full-precision sinks included (``None`` for a dense cache).

    Ours: the exact elements of the history's codes, scales, zero points and group map (their views, not the spare
    capacity of the buffers behind them) and of the sinks. transformers': the storage of its quantized tensors.
    """
    bits, elements = 0, 0
    for layer in cache.layers:
        store = getattr(layer, "store", None)
        if hasattr(store, "history_tensors"):
            tensors = store.history_tensors() + [t for t in (store.sink_keys, store.sink_values) if t is not None]
            b, h, d = store.key_codes.shape[0], store.key_codes.shape[1], store.key_scale.shape[-1]
            elements += 2 * b * h * (store.quantized_length + store._s) * d
            bits += 8 * sum(t.numel() * t.element_size() for t in tensors)
            continue
        quantized = quantized_layer_history(layer)
        tensors = held_tensors(*quantized)
        elements += sum(q.numel() for q in quantized)
        bits += 8 * sum(t.untyped_storage().nbytes() for t in tensors)
    return bits / elements if elements else None


@torch.no_grad()
def decode_step_times(model, makers: dict, ids: torch.Tensor, context: int, rounds: int, steps: int) -> dict:
    """Median seconds per single-token forward at ``context`` tokens, caches interleaved round-robin."""
    caches, tokens, times = {}, {}, {label: [] for label in makers}
    for label, make in makers.items():
        caches[label] = make()
        logits = model(ids[None, :context], **cache_kwargs(caches[label]), use_cache=True).logits
        tokens[label] = logits[:, -1:].argmax(-1)
    for _ in range(rounds):
        for label, cache in caches.items():
            for _ in range(steps):
                began = time.perf_counter()
                logits = model(tokens[label], **cache_kwargs(cache), use_cache=True).logits
                times[label].append(time.perf_counter() - began)
                tokens[label] = logits[:, -1:].argmax(-1)
    return {label: statistics.median(values) for label, values in times.items()}


def run(windows: int, context: int, target: int, rounds: int, steps: int, only=None, partial: Path | None = None) -> dict:
    model, tokenizer = load_default_model(), load_default_tokenizer()
    ids = tokenizer(load_default_text(), return_tensors="pt").input_ids[0]
    config = model.config
    bf16_bytes = context * kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 2)
    makers = candidates(model)
    if only:
        unknown = sorted(set(only) - set(makers))
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; rows are {list(makers)}")
        makers = {label: make for i, (label, make) in enumerate(makers.items()) if i == 0 or label in only}
    steps_s = decode_step_times(model, {k: v[1] for k, v in makers.items()}, ids, context, rounds, steps)
    rows = []
    for label, ((bits, nbits), make) in makers.items():
        result = compression_perplexity(model, make, ids, context_length=context, target_length=target, windows=windows)
        decode = decode_perplexity(model, make, ids, context, target, windows)
        cache = make()
        model(ids[None, :context], **cache_kwargs(cache), use_cache=True)
        rows.append({"cache": label, "bits": bits, "nbits": nbits, "ppl": result["ppl"],
                     "window_ppl": result["window_ppl"], "ppl_decode": decode["ppl"],
                     "window_ppl_decode": decode["window_ppl"],
                     "history_bits": history_bits(cache) or float(nbits), "bits_all": all_bits(cache, config, context),
                     "bytes_vs_bf16": cache_nbytes(cache) / bf16_bytes, "cache_bytes": cache_nbytes(cache),
                     "step_ms": 1000 * steps_s[label]})
        print(f"{label}: ppl {result['ppl']:.4f} decode {decode['ppl']:.4f}", flush=True)
        if partial is not None:  # what is measured so far survives an interrupted run
            write_json(partial, {"rows": rows})
    dense = rows[0]
    for row in rows:
        row["ppl_vs_dense_%"] = 100 * (row["ppl"] / dense["ppl"] - 1)
        row["decode_vs_dense_%"] = 100 * (row["ppl_decode"] / dense["ppl_decode"] - 1)
        row["step_vs_dense"] = row["step_ms"] / dense["step_ms"]
    return {
        "protocol": {"context_length": context, "target_length": target, "windows": windows,
                     "decode_rounds": rounds, "decode_steps_per_round": steps},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
        "command": "PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/quantized.py",
        "rows": rows,
    }


def render(report: dict) -> str:
    """The Markdown table of a report, numbers rounded for reading (the JSON keeps them whole)."""
    digits = {"ppl": 3, "ppl_vs_dense_%": 2, "ppl_decode": 3, "decode_vs_dense_%": 2, "history_bits": 2,
              "bits_all": 2, "bytes_vs_bf16": 3, "step_ms": 1, "step_vs_dense": 2}
    rows = [{k: f"{v:.{digits[k]}f}" if k in digits else v for k, v in row.items()} for row in report["rows"]]
    return markdown_table(rows, COLUMNS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--target", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per cache per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on shared machines)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--render", action="store_true", help="only re-render the tables from the saved JSON")
    parser.add_argument("--only", nargs="*", help="measure only these rows (labels; dense is always measured)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        report = json.loads((args.out / "quantized.json").read_text())
    else:
        report = run(args.windows, args.context, args.target, args.rounds, args.steps, args.only,
                     partial=args.out / "quantized.partial.json")
        saved = args.out / "quantized.json"
        if args.only and saved.exists():  # replace the measured rows of an earlier report, keep the others
            old = json.loads(saved.read_text())
            fresh = {row["cache"]: row for row in report["rows"]}
            kept = [fresh.pop(row["cache"], row) for row in old["rows"]]
            report = {**old, "rows": kept + list(fresh.values())}
        write_json(saved, report)
    table = render(report)
    print(table)
    (args.out / "quantized.md").write_text(table)
    doc = ROOT / "docs" / "strategies" / "quantized.md"
    if doc.exists() and args.out == ROOT / "benchmarks" / "results":
        text = doc.read_text()
        pattern = r"(<!-- benchmark:start -->\n).*?(<!-- benchmark:end -->)"
        doc.write_text(re.sub(pattern, lambda m: m.group(1) + table + m.group(2), text, flags=re.S))


if __name__ == "__main__":
    main()
