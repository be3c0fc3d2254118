"""``kvplus``: the command line.

* ``kvplus demo``: every registered cache on the embedded model and text (the README's first command).
* ``kvplus list``: registered strategies and presets.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .eval.demo import run_demo

    run_demo(out=args.out, stream_tokens=args.tokens, budget=args.budget, progress=not args.quiet, docs_dir=args.docs)
    return 0


def _list(args) -> int:
    from .caches.registry import get_spec, list_caches, list_presets

    for name in list_caches():
        spec = get_spec(name)
        print(f"{name:12s} {spec.description}" + (f" [{spec.paper}]" if spec.paper else ""))
    for name, (strategy, kwargs) in list_presets().items():
        print(f"{name:12s} preset: {strategy} with {kwargs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvplus", description="KV cache strategies for transformers, measured.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="every registered cache on the embedded model and text")
    demo.add_argument("--out", default="runs/demo", help="folder for demo.json and demo.md (default: runs/demo)")
    demo.add_argument("--tokens", type=int, default=4096, help="tokens streamed in the sink/window comparison")
    demo.add_argument("--budget", type=int, default=256, help="tokens kept per layer when streaming")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--docs", default=None, help="also write the tables the docs include into this folder")
    demo.set_defaults(func=_demo)
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
