"""Decode ms/step and prefill seconds of every strategy, side by side with transformers' dense, window and quanto caches.

A thin command line over :func:`hf_kvplus.bench.decode_benchmark`: for each (context, batch), every
strategy gets a fresh cache, is prefilled in chunks of 512 (``hf_kvplus.prefill``, timed), then greedy
single-token steps are timed in interleaved rounds (round r: ``--steps`` steps of each strategy in turn)
so that load from other processes affects all alike. Step time is the median; ratios are against
``dense`` (``DynamicCache``) and ``tf-window`` (transformers' ``DynamicSlidingWindowLayer`` at the same
budget) from the same run. Row ``b`` of a batch is the next ``context`` tokens of the text.

Run from the repository root (default: the embedded SmolLM2-135M, fp32, CPU; contexts 2048 and 8192 at
batch 1, 2048 at batch 4; budget 512; about 20 minutes on 2 CPU cores, nearly all of it prefill)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/decode_step.py --threads 1
    PYTHONPATH=. python benchmarks/decode_step.py --contexts 1024 --batch-sizes 1 --strategies dense tf-window sink
    PYTHONPATH=. python benchmarks/decode_step.py --render          # re-render the table from the saved JSON
    PYTHONPATH=. python benchmarks/decode_step.py --contexts 2304 --batch-sizes 4 --shared-prefix 2048 \
        --strategies dense prefix --out /tmp/prefix   # 4 rows on one 2k prefix: split attention vs DynamicCache
    python benchmarks/decode_step.py --device cuda --dtype bf16 --random-weights llama-3.1-8b   # GPU only

Writes ``benchmarks/results/decode_step.{json,md}`` (``--out`` elsewhere); ``benchmarks/render_docs.py``
puts the table on ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from hf_kvplus.bench import decode_benchmark, plan_strategies, render_markdown, slower_sentences
from hf_kvplus.eval.bench_model import SHAPES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STEM = "decode_step"
def environment(device: str) -> dict:
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    if device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    return {"machine": machine, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                             "transformers": transformers.__version__}}


def revision() -> str | None:
    """The code measured: ``git describe --always --dirty`` of this checkout (``None`` outside git)."""
    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return found.stdout.strip() or None


def write(report: dict, out: Path) -> str:
    table = render_markdown(report["rows"])
    meta = report["meta"]
    slower = slower_sentences(report["rows"])
    text = ["# Decode step and prefill time per strategy\n", table,
            f"Command: `{meta['command']}` (code at `{meta.get('revision')}`)", f"Model: {meta['model']}",
            f"Machine: {meta['machine']}", f"Wall time: {meta.get('seconds')} s",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
            f"Protocol: {meta['protocol']}", ""]
    text += [f"Skipped: `{k}`: {v}" for k, v in meta.get("skipped", {}).items()]
    text += ["", "Slower than dense or tf-window (decode step or prefill, by more than 5%):", ""] + [f"* {s}" for s in slower]
    (out / f"{STEM}.md").write_text("\n".join(text) + "\n")
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--max-batch-tokens", type=int, default=8192,
                        help="skip (context, batch) pairs above this many prompt tokens (default: 2048x4 but not 8192x4)")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--strategies", nargs="+", default=None,
                        help="labels: dense tf-window tf-quanto-int4 and registered hf_kvplus names (default: all)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per strategy per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--random-weights", choices=sorted(SHAPES), default=None,
                        help="a random-init model instead of the embedded one (llama-3.1-8b: GPU only)")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="rows of a batch share their first N tokens (the prefix cache holds them once)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only re-render the Markdown from the saved JSON")
    args = parser.parse_args(argv)
    path = args.out / f"{STEM}.json"
    if args.render:
        print(write(json.loads(path.read_text()), args.out))
        return
    from hf_kvplus.eval import parse_dtype
    from hf_kvplus.eval.bench_model import load_for_bench
    from hf_kvplus.eval.report import write_json

    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    runnable, skipped = plan_strategies(args.strategies)
    for label, reason in skipped.items():
        print(f"skipping {label}: {reason}", flush=True)
    model, ids, what = load_for_bench(args.random_weights or "default", dtype, args.device,
                                      random_weights=bool(args.random_weights))
    began = time.perf_counter()
    rows = decode_benchmark(model, runnable, args.contexts, args.batch_sizes, args.budget, args.steps, args.rounds,
                            args.device, input_ids=ids, max_batch_tokens=args.max_batch_tokens,
                            log=lambda line: print(line, flush=True), shared_prefix=args.shared_prefix)
    report = {"meta": {
        "command": "PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/decode_step.py "
                   + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "model": f"{what}, {str(dtype).removeprefix('torch.')}, {args.device}",
        "protocol": f"fresh cache per strategy and (context, batch); prefill in chunks of 512 (timed); one untimed "
                    f"step; then {args.steps} greedy steps x {args.rounds} interleaved rounds, median ms/step; budget "
                    f"{args.budget} for tf-window and evicting strategies; rows share their first {args.shared_prefix} "
                    f"tokens; peak_mib: memory peak during prefill minus "
                    + ("what was allocated before it" if args.device == "cuda" else
                       "what was resident before it, freed heap handed back to the OS first (malloc_trim)"),
        "seconds": round(time.perf_counter() - began), "skipped": skipped, "revision": revision(),
        **environment(args.device)},
        "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    print(write(report, args.out))
    print("\n".join(slower_sentences(rows)))


if __name__ == "__main__":
    main()
