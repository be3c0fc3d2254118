"""``kvplus``: the command line.

* ``kvplus eval [RECIPE] --out DIR``: run a recipe (default: every registered cache on the embedded
  model and text, the README's first command); ``kvplus demo`` is the same as ``kvplus eval``.
* ``kvplus eval cost-of-caching`` / ``kvplus eval prompt-order``: the studies of :mod:`hf_kvplus.eval.studies`.
* ``kvplus memory MODEL --context N --batch B``: KV cache bytes per token and for a workload, per strategy.
* ``kvplus push RUN_DIR --repo-id USER/NAME``: publish a run to the Hub as a dataset with a card.
* ``kvplus list``: registered strategies and presets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _eval(args) -> int:
    from .eval.recipe import load_recipe
    from .eval.studies import STUDIES, run_study

    if args.recipe in STUDIES:
        options = {k: v for k, v in (("new_tokens", args.new_tokens), ("turns", args.turns)) if v is not None}
        result = run_study(args.recipe, out=args.out, progress=not args.quiet, threads=args.threads, **options)
        print("\n" + (result["folder"] / "summary.md").read_text())
        print(f"wrote {', '.join(str(f) for f in result['files'])} ({result['seconds']:.0f} s)")
        return 0
    if args.new_tokens is not None or args.turns is not None:
        raise ValueError(f"--new-tokens and --turns apply to the studies {sorted(STUDIES)}, not to recipe {args.recipe!r}")
    from .eval.runner import run_recipe

    recipe = load_recipe(args.recipe)
    result = run_recipe(recipe, out=args.out, progress=not args.quiet, device=args.device, dtype=args.dtype,
                        threads=args.threads)
    if not result["rows"]:
        return 0  # not the main process under accelerate launch
    folder = result["folder"]
    print("\n" + (folder / "summary.md").read_text())
    print(f"wrote {folder / 'results.csv'}, {folder / 'results.jsonl'}, {folder / 'summary.md'} and "
          f"{folder / 'pareto.png'} ({result['seconds']:.0f} s)")
    failed = [r for r in result["rows"] if r.get("status") == "error"]
    return 1 if failed else 0


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
    memory.add_argument("--context", type=int, required=True, help="tokens per sequence")
    memory.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    memory.add_argument("--dtype", default="bf16", help="dtype of keys and values (default bf16)")
    memory.add_argument("--budget", type=int, default=1024, help="tokens kept by evicting strategies (default 1024)")
    memory.add_argument("--prefix", type=int, default=0, help="prompt tokens shared by the whole batch (default 0)")
    memory.add_argument("--json", action="store_true", help="machine-readable output")
    memory.set_defaults(func=_memory)
    listing = commands.add_parser("list", help="registered strategies and presets")
    listing.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        print(f"kvplus: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
