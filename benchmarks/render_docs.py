"""Render ``docs/benchmarks.md`` from the saved benchmark results (never typed by hand).

Reads ``benchmarks/results/peers.json`` (``benchmarks/peers.py``), ``peers_lee.json`` (``peers.py --text lee``),
``quantized.json``
(``benchmarks/quantized.py``), ``scaling.json`` (``benchmarks/scaling.py``, whose plot is
``docs/images/scaling.png``) and ``decode_step.json`` (``benchmarks/decode_step.py``), and states plainly
every row where a peer beats us.

Run from the repository root::

    PYTHONPATH=. python benchmarks/render_docs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_step  # noqa: E402
import peers  # noqa: E402
import quantized  # noqa: E402
import scaling  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"


def peer_wins(rows: list[dict]) -> list[str]:
    """One sentence per row of ours that a peer beats on perplexity at the same keep ratio."""
    sentences = []
    for row in rows:
        if row.get("library") != "hf_kvplus":
            continue
        best, margin = row.get("best_peer"), row.get("vs_best_peer_%")
        if best and margin is not None and margin > 0:
            peer = next(r for r in rows if r["strategy"] == best and r["keep"] == row["keep"])
            sentences.append(f"At keep {row['keep']:g}, {peer['library']} `{best}` ({peer['ppl']:.3f}) beats our "
                             f"`{row['strategy']}` ({row['ppl']:.3f}) by {margin:.1f}% perplexity.")
    return sentences


def best_by_keep(rows: list[dict]) -> dict[float, tuple[dict, dict]]:
    """For each keep ratio below 1: (our best row, the best peer row) by perplexity, where both exist."""
    best = {}
    for keep in sorted({r["keep"] for r in rows if r["keep"] < 1}, reverse=True):
        at = [r for r in rows if r["keep"] == keep and "ppl" in r]
        ours = [r for r in at if r.get("library") == "hf_kvplus"]
        theirs = [r for r in at if r.get("library") == "kvpress"]
        if ours and theirs:
            best[keep] = (min(ours, key=lambda r: r["ppl"]), min(theirs, key=lambda r: r["ppl"]))
    return best


def ordering_table(reports: dict[str, dict]) -> str:
    """Per text and keep ratio: our best strategy, kvpress's best press, and the gap (negative: ours is better).

    Only the strategies each report ran are compared, so the table says which ran (``strategies`` column)."""
    from hf_kvplus.eval.report import markdown_table

    lines = []
    for text, report in reports.items():
        ran = sorted({r["strategy"] for r in report["rows"] if r["keep"] < 1})
        for keep, (ours, theirs) in best_by_keep(report["rows"]).items():
            lines.append({"text": text, "keep": f"{keep:g}", "best of ours": f"{ours['strategy']} {ours['ppl']:.3f}",
                          "best kvpress press": f"{theirs['strategy']} {theirs['ppl']:.3f}",
                          "gap_%": f"{100 * (ours['ppl'] / theirs['ppl'] - 1):+.2f}", "strategies run": len(ran)})
    return markdown_table(lines, ["text", "keep", "best of ours", "best kvpress press", "gap_%", "strategies run"])


def quantized_wins(rows: list[dict]) -> list[str]:
    """Sentences for every quantized row where transformers' QuantizedCache beats ours at the same bits."""
    sentences = []
    for theirs in (r for r in rows if r["cache"].startswith("transformers")):
        ours = next((r for r in rows if r["cache"] == f"hf_kvplus int{theirs['nbits']}"), None)
        if ours is None:
            continue
        for field, what in (("ppl", "perplexity"), ("cache_bytes", "cache bytes"), ("step_ms", "decode step time")):
            if theirs[field] < ours[field]:
                sentences.append(f"int{theirs['nbits']}: `{theirs['cache']}` beats `{ours['cache']}` on {what} "
                                 f"({theirs[field]:,.3g} vs {ours[field]:,.3g}, {100 * (ours[field] / theirs[field] - 1):.0f}% "
                                 f"more for us).")
    return sentences


def _meta_lines(meta: dict) -> str:
    lines = [f"* Command: `{meta.get('command', '')}`"]
    for key in ("protocol", "model", "machine"):
        if key in meta:
            lines.append(f"* {key.capitalize()}: {meta[key]}")
    versions = meta.get("versions") or meta.get("environment")
    if versions:
        lines.append("* Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def page(peer_report: dict | None, quantized_report: dict | None, scaling_report: dict | None,
         decode_report: dict | None = None, second_report: dict | None = None) -> str:
    """The Markdown of ``docs/benchmarks.md`` from the five reports (any may be missing)."""
    out = ["# Benchmarks against the peers", "",
           "Every figure on this page comes from a script under `benchmarks/` whose command is given with its "
           "table; the page itself is rendered by `PYTHONPATH=. python benchmarks/render_docs.py`. Model: the "
           "embedded SmolLM2-135M-Instruct (GGUF, float32), on CPU. To reproduce the peer table, the scaling "
           "plot and this page on a fresh machine, one command (it builds `.venv`, then `.venv-kvpress` for kvpress "
           "on first use; about 45 minutes on 2 CPU cores):",
           "", "```bash", "make benchmarks", "```", "",
           "It runs `benchmarks/peers.py`, `benchmarks/scaling.py` and `benchmarks/render_docs.py`; each script "
           "takes subsets (`--ratios`, `--strategies`, `--lengths`) and `peers.py` resumes from its saved rows. "
           "The quantized table comes from `benchmarks/quantized.py` (about 25 minutes).", ""]
    out += ["## Context compression: hf_kvplus, kvpress and transformers", "",
            "Prefill 2,048 tokens, keep a share of them, score the next 256 teacher-forced; 3 consecutive "
            "windows of the embedded text; `ppl` is the mean of the window perplexities. All rows use the same "
            "token ids. kvpress 0.5.5 pins transformers < 5.3, so its presses run in a separate virtual "
            "environment (`benchmarks/peers/kvpress_protocol.py`, built by `peers.py`: torch 2.13.0, "
            "kvpress 0.5.5, transformers < 5.3); its `kvpress dense` row checks that both stacks give the same "
            "baseline. After a press, kvpress's cache mask follows the physical slots while positions follow "
            "the original tokens; the protocol passes both explicitly. `counterpart` is the peer implementing "
            "the same idea (for `h2o`: kvpress's `ObservedAttentionPress`, accumulated attention at prefill); "
            "`best_peer` is the best peer row at the same keep ratio. `sliding-window` is transformers' "
            "`DynamicSlidingWindowLayer` (no sinks); its `cache_mib` after the one-shot prefill is what it pins: "
            "the kept slice is a view of the whole prefill until the next forward.", ""]
    if peer_report:
        out += [peers.render(peer_report), "", _meta_lines(peer_report["meta"]), ""]
        wins = peer_wins(peer_report["rows"])
        out += ["**Where a peer beats us:**", ""]
        out += [f"* {s}" for s in wins] if wins else ["* Nowhere in this table: every row of ours is at least as "
                                                      "good as the best peer at its keep ratio."]
        out += [""]
    else:
        out += ["*Not run yet: `benchmarks/peers.py`.*", ""]
    out += second_text_section(peer_report, second_report)
    out += ["## Quantized storage: hf_kvplus against transformers `QuantizedCache` (quanto)", "",
            "Same protocol at full context (nothing evicted); bytes relative to a bf16 dense cache; decode step "
            "time at 2k context, interleaved.", ""]
    if quantized_report:
        out += [quantized.render(quantized_report), "",
                _meta_lines({**quantized_report, "machine": quantized_report.get("environment", {}).get("machine")}),
                ""]
        wins = quantized_wins(quantized_report["rows"])
        out += ["**Where transformers beats us:**", ""]
        out += [f"* {s}" for s in wins] if wins else ["* Nowhere in this table."]
        out += [""]
    else:
        out += ["*Not run yet: `benchmarks/quantized.py`.*", ""]
    out += ["## How memory and decode time grow with context", ""]
    if scaling_report:
        out += ["![cache bytes and decode step time against context length](images/scaling.png)", "",
                "Dense and `int4` grow with the context (measured up to the model's 8k trained context); "
                "`sink`, `h2o` and `h2o+int4` stay at their budget, so they are measured to 32k. `sink` re-rotates "
                "its keys and streams past the trained context; past 8k, `h2o` keeps original positions, so only "
                "its bytes and time are meaningful there. Ratios are against dense at the same length.", "",
                scaling.render(scaling_report), "", _meta_lines(scaling_report["meta"]), ""]
    else:
        out += ["*Not run yet: `benchmarks/scaling.py`.*", ""]
    out += decode_section(decode_report)
    return "\n".join(out)


def second_text_section(peer_report: dict | None, second_report: dict | None) -> list[str]:
    """The same protocol on a second English text (``peers.py --text lee``), and the best of each side per text."""
    out = ["## The same protocol on a second English text", "",
           "To check that the ordering is not an artefact of one text, `benchmarks/peers.py --text lee` runs the "
           "protocol above on the Lee background corpus: 300 ABC news articles that the gensim 4.4.0 wheel on PyPI "
           "ships as test data (`benchmarks/second_text.py` reads it out of the wheel and checks its SHA-256). "
           "News prose is far from the default text's Python documentation: dense perplexity is about twice as "
           "high. The table compares the best row of ours with kvpress's best press at each keep ratio, on each "
           "text, over the strategies each run holds.", ""]
    if not second_report:
        return out + ["*Not run yet: `benchmarks/peers.py --text lee`.*", ""]
    reports = {"default": peer_report, "lee": second_report} if peer_report else {"lee": second_report}
    out += [ordering_table(reports), "", peers.render(second_report), "", _meta_lines(second_report["meta"]), ""]
    wins = peer_wins(second_report["rows"])
    out += ["**Where a peer beats us on this text:**", ""]
    out += [f"* {s}" for s in wins] if wins else ["* Nowhere in this table."]
    return out + [""]


def decode_section(report: dict | None) -> list[str]:
    """The decode step section: every strategy against transformers' dense, window and quanto caches."""
    from hf_kvplus.bench import render_markdown, slower_sentences

    out = ["## Decode step and prefill time: every strategy against transformers' caches", "",
           "Each strategy gets a fresh cache per (context, batch), is prefilled in chunks of 512 tokens "
           "(`hf_kvplus.prefill`, the same for `dense`), then greedy single-token steps are timed in interleaved "
           "rounds, so that load from other processes affects all alike; `step_ms` is the median. `dense` is "
           "`DynamicCache`; `tf-window` is transformers' `DynamicSlidingWindowLayer` at the same budget (no sinks); "
           "`tf-quanto-int4` is transformers' `QuantizedCache` with optimum-quanto. Ratios come from the same run. "
           "`cache_mib` is `hf_kvplus.cache_nbytes` right after prefill (for `tf-window`, the kept slice is a view "
           "of the last chunk's concatenation, so it pins budget + 512 tokens until the next forward); `peak_mib` "
           "is the peak during prefill minus what was resident before (CPU RSS, after handing freed heap back to the "
           "OS: a rough figure, activations included). `library` says whose cache it is. Strategies with a budget "
           "are judged against `tf-window` and `dense`; those that keep every token (`int*`, `prefix`) against "
           "`dense` only. Re-run (then re-render this page):", "",
           "```bash", "make bench-decode", "```", ""]
    if not report:
        return out + ["*Not run yet: `benchmarks/decode_step.py`.*", ""]
    meta = report["meta"]
    out += [render_markdown(report["rows"]), "", _meta_lines(meta)]
    out += [f"* Code: `{meta['revision']}`, {meta.get('seconds')} s wall"] if meta.get("revision") else []
    out += [""]
    skipped = report["meta"].get("skipped") or {}
    if skipped:
        out += ["Left out: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".", ""]
    slower = slower_sentences(report["rows"])
    out += ["**Where our decode step is slower than transformers' dense or window cache** (more than 5%):", ""]
    out += [f"* {s}" for s in slower] if slower else ["* Nowhere in this table."]
    return out + [""]


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    PAGE.write_text(page(_load("peers"), _load("quantized"), _load("scaling"), _load(decode_step.STEM),
                         _load(peers.stem("lee"))))
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
