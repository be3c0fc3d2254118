"""``kvplus``: the command line.

* ``kvplus eval [RECIPE] --out DIR``: run a recipe (default: every registered cache on the embedded
  model and text, the README's first command); ``kvplus demo`` is the same as ``kvplus eval``.
* ``kvplus eval cost-of-caching`` / ``kvplus eval prompt-order``: packaged recipes of the ``cost_of_caching`` and
  ``prompt_order`` protocols, run like any recipe (resumable run folder, ``accelerate launch``).
* ``kvplus generate MODEL [PROMPT] --cache NAME [--budget N] [--compare]``: one prompt through one cache: the
  text, the bytes the cache holds, time to first token, decode tokens/s (and peak GPU memory on CUDA).
* ``kvplus bench MODEL --context N [--batch B] [--strategies ...]``: decode ms/step, prefill s and bytes per
  strategy beside transformers' caches (:func:`hf_kvplus.bench.decode_benchmark`); ``--random-weights``
  measures a shape from its config alone.
* ``kvplus memory MODEL --context N --batch B``: KV cache bytes per token and for a workload, per strategy.
* ``kvplus push RUN_DIR --repo-id USER/NAME``: publish a run to the Hub as a dataset with a card.
* ``kvplus list``: registered strategies and presets.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def _eval(args) -> int:
    from .eval.recipe import load_recipe

    options = {k: v for k, v in (("new_tokens", args.new_tokens), ("turns", args.turns)) if v is not None}
    try:
        recipe = load_recipe(args.recipe, options=options)  # validated once, before any model loads
    except ValueError as error:
        if options and "belong to no protocol" in str(error):
            raise ValueError(f"--new-tokens and --turns apply to the studies cost-of-caching and prompt-order "
                             f"(protocols cost_of_caching, prompt_order), not to recipe {args.recipe or 'default'!r}: "
                             f"{error}") from None
        raise
    from .eval.runner import run_recipe

    result = run_recipe(recipe, out=args.out, progress=not args.quiet, device=args.device, dtype=args.dtype,
                        threads=args.threads)
    if not result["rows"]:
        return 0  # not the main process under accelerate launch
    folder = result["folder"]
    print("\n" + (folder / "summary.md").read_text())
    if result.get("reused"):
        print(f"reused {result['reused']} finished grid point(s) from {folder}; measured {result['measured']}"
              + (" (no model loaded)" if not result["measured"] else ""))
    written = [folder / "results.csv", folder / "results.jsonl", folder / "summary.md", *sorted(folder.glob("*.png"))]
    print(f"wrote {', '.join(str(f) for f in written)} ({result['seconds']:.0f} s)")
    failed = [r for r in result["rows"] if r.get("status") == "error"]
    return 1 if failed else 0


def tokens(text: str) -> int:
    """A token count: ``8192``, ``128k`` (x1024) or ``1M`` (x1024**2); the commands check the range.

    Raises:
        argparse.ArgumentTypeError: not an integer with an optional ``k``/``M`` suffix."""
    found = re.fullmatch(r"(-?\d+)([kKmM]?)", str(text).strip().replace("_", "").replace(",", ""))
    if found is None:
        raise argparse.ArgumentTypeError(f"bad token count {text!r}: give an integer, or one with k or M (128k, 1M)")
    return int(found[1]) * {"": 1, "k": 2**10, "m": 2**20}[found[2].lower()]


def _device_dtype(args) -> tuple[str, str]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); use --device cpu")
    return device, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def _generate(args) -> int:
    from .eval.generate import DEFAULT_PROMPT, build_cache, format_generation, generate_with_cache
    from .eval.models import load_model_and_tokenizer
    from .planner import load_config

    device, dtype = _device_dtype(args)
    build_cache(load_config(args.model), args.cache, args.budget, args.nbits)  # bad settings fail before loading
    model, tokenizer = load_model_and_tokenizer(args.model, dtype, device)
    rows = generate_with_cache(model, tokenizer, args.prompt or DEFAULT_PROMPT, args.cache, args.budget, args.nbits,
                               args.max_new_tokens, compare=args.compare, chat=not args.no_chat_template)
    print(format_generation(rows))
    return 0


def _bench(args) -> int:
    import json

    from .bench import decode_benchmark, plan_strategies, render_markdown
    from .eval.bench_model import load_for_bench

    device, dtype = _device_dtype(args)
    runnable, skipped = plan_strategies(args.strategies)  # unknown names fail before the model loads
    model, ids, what = load_for_bench(args.model, dtype, device, random_weights=args.random_weights)
    need = max(c * b for c in args.context for b in args.batch)
    if ids is not None and ids.numel() < need:  # e.g. 32k x 4 rows of a 113k-token text: the text again, and again
        ids = ids.repeat(-(-need // ids.numel()))
        what += f" (its default text repeated to {need:,} tokens)"
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = decode_benchmark(model, runnable, args.context, args.batch, args.budget, args.steps, args.rounds, device,
                            input_ids=ids, max_batch_tokens=None, log=log)
    if args.json:
        print(json.dumps({"model": f"{what}, {dtype}, {device}", "skipped": skipped, "rows": rows}, indent=2))
    else:
        print(f"{what}, {dtype}, {device}; budget {args.budget}; peak_mib: "
              + ("CUDA max_memory_allocated during prefill, minus what was allocated before" if device.startswith("cuda")
                 else "peak RSS during prefill, minus what was resident before"))
        print(render_markdown(rows))
        for label, reason in skipped.items():
            print(f"skipped {label}: {reason}")
    return 0


def _push(args) -> int:
    from .eval.hub import push_run

    where = push_run(args.run_dir, args.repo_id, dry_run=args.dry_run, private=args.private)
    if args.dry_run:
        files = sorted(p.name for p in Path(where).iterdir())
        print(f"dry run: wrote {files} into {where}; nothing uploaded")
    else:
        print(f"uploaded {args.run_dir} to {where}")
    return 0


def _list(args) -> int:
    from .registry import get_spec, list_caches, list_presets

    for name in list_caches():
        spec = get_spec(name)
        print(f"{name:12s} {spec.description}" + (f" [{spec.paper}]" if spec.paper else ""))
    for name, (strategy, kwargs) in list_presets().items():
        print(f"{name:12s} preset: {strategy} with {kwargs}")
    return 0


def _memory(args) -> int:
    import json

    from .planner import format_plan, load_config, plan

    report = plan(load_config(args.model), args.context, args.batch, args.dtype, args.budget, args.prefix)
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    return 0


MODEL_HELP = "default (the embedded SmolLM2-135M), a local folder, or a Hub id (online only)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvplus", description="KV cache strategies for transformers, measured.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("eval", "demo"):
        sub = commands.add_parser(command, help="run a recipe (default: every registered cache on the embedded "
                                  "model and text)" + (" (same as eval)" if command == "demo" else ""))
        sub.add_argument("recipe", nargs="?", default=None,
                         help="a recipe YAML file, a packaged recipe name (default: the default recipe), or a study: "
                              "cost-of-caching, prompt-order")
        sub.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>); re-running resumes")
        sub.add_argument("--device", default=None, help="override the recipe's device (cpu, cuda, cuda:1 ...)")
        sub.add_argument("--dtype", default=None, help="override the recipe's dtype (float32, bfloat16, float16)")
        sub.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        sub.add_argument("--new-tokens", type=int, nargs="+", default=None, metavar="N",
                         help="cost-of-caching: lengths to report (default 64 128 256 512 1024)")
        sub.add_argument("--turns", type=int, default=None, help="prompt-order: turns of the agent loop (default 8)")
        sub.set_defaults(func=_eval)
    generate = commands.add_parser("generate", help="one prompt through one cache: the text, bytes held, time to "
                                   "first token, decode speed (--compare: beside DynamicCache)")
    generate.add_argument("model", help=MODEL_HELP)
    generate.add_argument("prompt", nargs="?", default=None, help="the prompt (default: a question about KV caches)")
    generate.add_argument("--cache", required=True, help="a strategy or preset (kvplus list), e.g. sink, int4, h2o")
    generate.add_argument("--budget", type=tokens, default=None, help="tokens kept per layer (evicting strategies)")
    generate.add_argument("--nbits", type=int, default=None, help="8, 4 or 2: packed storage for any strategy")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate, greedy (default 64)")
    generate.add_argument("--compare", action="store_true", help="also run DynamicCache on the same input")
    generate.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is")
    bench = commands.add_parser("bench", help="decode ms/step, prefill s, bytes and peak memory per strategy")
    bench.add_argument("model", help=MODEL_HELP + "; with --random-weights also llama-3.1-8b or llama-tiny")
    bench.add_argument("--context", type=tokens, nargs="+", required=True, help="prompt tokens per row (e.g. 8192 32k)")
    bench.add_argument("--batch", type=int, nargs="+", default=[1], help="rows per batch (default 1)")
    bench.add_argument("--strategies", nargs="+", default=None,
                       help="dense tf-window tf-quanto-int4 and registered names (default: all of them)")
    bench.add_argument("--budget", type=tokens, default=512, help="tokens kept by evicting strategies (default 512)")
    bench.add_argument("--steps", type=int, default=8, help="decode steps per strategy per round (default 8)")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    bench.add_argument("--random-weights", action="store_true", help="random weights from the model's config alone")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    for sub, func in ((generate, _generate), (bench, _bench)):
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sub.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, "
                         "bfloat16 on CUDA)")
        sub.set_defaults(func=func)
    push = commands.add_parser("push", help="publish a run folder to the Hub as a dataset with a card")
    push.add_argument("run_dir", help="a folder written by kvplus eval")
    push.add_argument("--repo-id", required=True, help="dataset repository, user/name (created if missing)")
    push.add_argument("--dry-run", default=None, metavar="DIR", help="write what would be uploaded into DIR instead")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.set_defaults(func=_push)
    memory = commands.add_parser("memory", help="KV cache bytes per token and for a workload, per strategy")
    memory.add_argument("model", nargs="?", default="default",
                        help="default (the embedded model), a folder with config.json, a config.json or .gguf file, "
                             "or a Hub id (online only)")
    memory.add_argument("--context", type=tokens, required=True, help="tokens per sequence (8192, 128k, 1M)")
    memory.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    memory.add_argument("--dtype", default=None, help="dtype of keys, values and weights (default: the model's own; "
                        "float32 for the embedded model)")
    memory.add_argument("--budget", type=tokens, default=1024, help="tokens kept by evicting strategies (default 1024)")
    memory.add_argument("--prefix", type=tokens, default=0, help="prompt tokens shared by the whole batch (default 0)")
    memory.add_argument("--json", action="store_true", help="machine-readable output")
    memory.set_defaults(func=_memory)
    listing = commands.add_parser("list", help="registered strategies and presets")
    listing.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, ConnectionError) as error:
        print(f"kvplus: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
