"""Running recipes on a tiny saved model: the run folder, resuming, data sources and the command line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny

import hf_kvplus
from hf_kvplus import registry
from hf_kvplus.cli import main
from hf_kvplus.eval import compression_perplexity, load_model_and_tokenizer, load_recipe, run_recipe
from hf_kvplus.eval import runner as runner_module
from hf_kvplus.eval.data import DataSpec, load_token_ids
from hf_kvplus.eval.protocols import PROTOCOLS, get_protocol

TEXT = "The quick brown fox jumps over the lazy dog while attention sinks hold the cache steady. " * 40


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KVPLUS_CACHE", str(tmp_path / "cache"))


SMALL = [
    {"name": "compression", "protocol": {"name": "compression", "context_length": 48, "target_length": 8},
     "grid": ["dynamic"]},
    {"name": "streaming", "protocol": {"name": "streaming", "num_tokens": 60, "report_every": 20},
     "grid": [{"strategy": "sink", "budget": 16}]},
]


def write_recipe(tmp_path, tiny_dir, data=None, experiments=None, **extra):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    raw = {
        "name": "tiny", "model": tiny_dir, "data": data or {"path": str(text)},
        "experiments": experiments or [
            {"name": "compression", "protocol": {"name": "compression", "context_length": 48, "target_length": 8,
                                                 "windows": 2, "decode_tokens": 2},
             "keep_ratios": [0.5, 0.25], "grid": ["all", "window"]},
            {"name": "streaming", "protocol": {"name": "streaming", "num_tokens": 80, "report_every": 20},
             "budgets": [16], "grid": [{"strategy": "dynamic", "chunk_size": 20}, "sink", "window"]},
        ], **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class NotCalled:
    """The tokenizer's identity (what the token cache is keyed by), failing if asked to tokenize."""

    def __init__(self, tokenizer):
        self.backend_tokenizer, self.name_or_path = tokenizer.backend_tokenizer, tokenizer.name_or_path

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_a_run_writes_results_plot_and_summary(tmp_path, tiny_dir):
    result = run_recipe(load_recipe(write_recipe(tmp_path, tiny_dir)), out=tmp_path / "run", progress=False)
    rows = read_csv(tmp_path / "run" / "results.csv")
    expected = 2 + 3  # window at 2 keep ratios, 3 streaming points, plus every registered strategy:
    for name in hf_kvplus.list_caches():
        spec = hf_kvplus.get_spec(name)
        expected += (2 if spec.evicting else 1) * math.prod(len(v) for v in spec.sweep.values())
    assert len(rows) == len(result["rows"]) == expected
    assert {"strategy", "ppl", "cache_mib", "experiment", "settings"} <= set(rows[0])
    dense = [r for r in rows if r["strategy"] == "dynamic" and r["experiment"] == "compression"]
    assert len(dense) == 1 and dense[0]["settings"] == "all tokens" and float(dense[0]["memory_saved"]) == 0
    model, tokenizer = load_model_and_tokenizer(tiny_dir)
    ids = load_token_ids(DataSpec(source="file", path=str(tmp_path / "text.txt")), tokenizer)
    direct = compression_perplexity(model, lambda: hf_kvplus.make_cache("dynamic", model), ids, 48, 8, 2)
    assert float(dense[0]["ppl"]) == pytest.approx(direct["ppl"], rel=1e-5)
    sink = [r for r in rows if r["strategy"] == "sink" and r["experiment"] == "compression"]
    assert sorted(int(r["budget"]) for r in sink) == [12, 24]
    assert all(float(r["cache_mib"]) < float(dense[0]["cache_mib"]) for r in sink)
    streamed = [r for r in result["rows"] if r["experiment"] == "streaming"]
    assert [r["exact"] for r in streamed] == [True, True, True] and streamed[0]["chunk_size"] == 20
    assert len(set(streamed[1]["window_cache_mib"][1:])) == 1  # flat at the budget
    png = (tmp_path / "run" / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "## compression\n" in summary and "| sink | keep_ratio=0.5, budget=24 |" in summary
    assert "Perplexity and cache MiB of each 20-token window" in summary
    assert (tmp_path / "run" / "recipe.yaml").read_text() == (tmp_path / "tiny.yaml").read_text()


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path, tiny_dir, monkeypatch):
    path = write_recipe(tmp_path, tiny_dir)
    real, calls = runner_module.run_point, []

    def interrupted(model, tokenizer, ids, protocol, point, progress=False):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(point.key)
        return real(model, tokenizer, ids, protocol, point, progress)

    monkeypatch.setattr(runner_module, "run_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path), out=tmp_path / "run", progress=False)
    first = [json.loads(line)["key"] for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert first == calls and len(read_csv(tmp_path / "run" / "results.csv")) == 3
    done, calls[:] = list(calls), []
    monkeypatch.setattr(runner_module, "run_point", lambda *a, **k: (calls.append(a[4].key), real(*a, **k))[1])
    result = run_recipe(load_recipe(path), out=tmp_path / "run", progress=False)
    assert not set(calls) & set(done)  # nothing measured twice
    measured = [r for r in result["rows"] if r.get("status") != "skipped"]  # snapkv at 12 or 24 tokens: degenerate
    assert len(calls) + len(done) == len(measured)
    assert len(result["rows"]) == len(read_csv(tmp_path / "run" / "results.csv"))
    calls[:] = []
    run_recipe(load_recipe(path), out=tmp_path / "run", progress=False)
    assert calls == []  # a finished run is not measured again


def test_a_changed_recipe_does_not_reuse_stale_points(tmp_path, tiny_dir, monkeypatch):
    run_recipe(load_recipe(write_recipe(tmp_path, tiny_dir, experiments=SMALL)), out=tmp_path / "run", progress=False)
    raw = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    raw["experiments"][1]["protocol"]["num_tokens"] = 50
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    calls = []
    real = runner_module.run_point
    monkeypatch.setattr(runner_module, "run_point", lambda *a, **k: (calls.append(a[4].key), real(*a, **k))[1])
    result = run_recipe(load_recipe(tmp_path / "tiny.yaml"), out=tmp_path / "run", progress=False)
    assert calls == ['streaming|sink|{"budget": 16}']  # the compression point is reused
    assert [r["tokens_scored"] for r in result["rows"]] == [8, 49]


@pytest.mark.parametrize("kind", ["save_to_disk", "text builder", "jsonl file"])
def test_datasets_and_files_give_the_same_tokens(tmp_path, tiny_dir, kind):
    import datasets

    documents = [TEXT[:1500], TEXT[1500:]]
    if kind == "save_to_disk":
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"body": documents})}).save_to_disk(tmp_path / "ds")
        data = {"dataset": str(tmp_path / "ds"), "split": "test", "column": "body"}
    elif kind == "text builder":
        (tmp_path / "doc.txt").write_text("\n\n".join(documents))
        data = {"dataset": "text", "data_files": str(tmp_path / "doc.txt"), "split": "train", "max_documents": 1}
        documents = documents[:1]  # the text builder makes one row per line; max_documents keeps the first
    else:
        (tmp_path / "doc.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in documents))
        data = {"path": str(tmp_path / "doc.jsonl")}
    _, tokenizer = load_model_and_tokenizer(tiny_dir)
    spec = DataSpec.parse(data)
    ids = load_token_ids(spec, tokenizer)
    expected = tokenizer("\n\n".join(d.strip() for d in documents))["input_ids"]
    assert ids.tolist() == expected
    files = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(files) == 1
    assert load_token_ids(spec, NotCalled(tokenizer)).tolist() == expected  # read back from the cache
    recipe = load_recipe(write_recipe(tmp_path, tiny_dir, data=data, experiments=SMALL))
    assert [r["status"] for r in run_recipe(recipe, out=tmp_path / "run", progress=False)["rows"]] == ["ok", "ok"]


def test_missing_data_errors_are_clear(tmp_path, tiny_dir):
    _, tokenizer = load_model_and_tokenizer(tiny_dir)
    with pytest.raises(ValueError, match=r"could not load dataset 'no-such-dataset-xyz' .*HF_HUB_OFFLINE=1"):
        load_token_ids(DataSpec.parse({"dataset": "no-such-dataset-xyz"}), tokenizer)
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['body'\]"):
        load_token_ids(DataSpec.parse({"dataset": str(tmp_path / "ds")}), tokenizer)
    with pytest.raises(FileNotFoundError, match="data file .*missing.txt' does not exist"):
        load_token_ids(DataSpec.parse(str(tmp_path / "missing.txt")), tokenizer)


def test_a_strategy_the_sweep_cannot_build_is_reported_not_dropped(tmp_path, tiny_dir):
    def needs_a_store(config, store=None):
        if store is None:
            raise ValueError("needs store=<a PrefixStore>")
        return None

    hf_kvplus.register_cache(registry.CacheSpec(name="test-needs-store", factory=needs_a_store, description="x"))
    try:
        recipe = load_recipe(write_recipe(tmp_path, tiny_dir, experiments=[{**SMALL[0], "grid": ["all"], "keep_ratios": [0.5]}]))
        result = run_recipe(recipe, out=tmp_path / "run", progress=False)
    finally:
        registry._REGISTRY.pop("test-needs-store")
    skipped = [r for r in result["rows"] if r["strategy"] == "test-needs-store"]
    assert [r["status"] for r in skipped] == ["skipped"] and "needs store=<a PrefixStore>" in skipped[0]["reason"]
    assert "| test-needs-store | all tokens | skipped |" in (tmp_path / "run" / "summary.md").read_text()


def test_an_explicit_value_the_cache_rejects_fails_before_measuring(tmp_path, tiny_dir, monkeypatch):
    path = write_recipe(tmp_path, tiny_dir)
    raw = yaml.safe_load(path.read_text())
    raw["experiments"][1]["grid"].append({"strategy": "sink", "budget": 16, "num_sink_tokens": 20})
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(runner_module, "run_point", lambda *a, **k: pytest.fail("measured before checking"))
    with pytest.raises(ValueError, match=r"budget \(16\) must be larger than num_sink_tokens \(20\)"):
        run_recipe(load_recipe(path), out=tmp_path / "run", progress=False)


def test_the_command_line(tmp_path, tiny_dir, capsys):
    assert main(["eval", str(write_recipe(tmp_path, tiny_dir, experiments=SMALL)), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| dynamic | all tokens |" in printed and "pareto.png" in printed
    assert main(["eval", str(tmp_path / "nope.yaml")]) == 2
    assert "neither a file nor a packaged recipe" in capsys.readouterr().err


def test_peak_memory_is_reset_between_points():
    # In a fresh interpreter: late in a long test session freed pages stay resident and a new block may
    # not raise the resident set at all, so the measurement would depend on which tests ran before.
    script = """
import torch
from hf_kvplus.memory import peak_memory, reset_peak_memory
reset_peak_memory()
before = peak_memory()["peak_rss_bytes"]
block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
grown = peak_memory()["peak_rss_bytes"]
del block
reset_peak_memory()
print(before, grown, peak_memory()["peak_rss_bytes"], peak_memory()["device_peak_bytes"])
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    before, grown, after = (int(value) for value in out[:3])
    assert grown - before >= 60 * 2**20
    assert after < grown - 30 * 2**20
    assert out[3] == "None"


def test_strategies_that_switch_attention_hand_the_model_back(tmp_path, tiny_dir):
    spec = registry.CacheSpec(name="test-scored", factory=hf_kvplus.SinkCache, description="x", evicting=True,
                              attention_scores=True)
    hf_kvplus.register_cache(spec)
    try:
        model, tokenizer = load_model_and_tokenizer(tiny_dir)
        recipe = load_recipe(write_recipe(tmp_path, tiny_dir, experiments=[
            {**SMALL[0], "grid": [{"strategy": "test-scored", "budget": 16}]}]))
        seen = []
        real_protocol = get_protocol("compression")

        class Spy(type(real_protocol)):
            def run(self, model, *args, **kwargs):
                result = super().run(model, *args, **kwargs)
                seen.append(model.config._attn_implementation)
                return result

        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(PROTOCOLS, "compression", Spy())
            rows = run_recipe(recipe, out=tmp_path / "run", progress=False, model=model, tokenizer=tokenizer)["rows"]
    finally:
        registry._REGISTRY.pop("test-scored")
    assert rows[0]["status"] == "ok" and seen == ["sdpa"]  # scoring attention only inside the cache's forwards
    assert model.config._attn_implementation == "sdpa"


def test_compression_reports_the_peak_cache_and_decode_speed():
    from conftest import prompt, tiny_model
    from transformers import DynamicCache

    model = tiny_model("llama-gqa")
    ids = prompt(length=60, seed=2)[0]
    result = compression_perplexity(model, lambda: DynamicCache(config=model.config), ids, context_length=20,
                                    target_length=10, windows=1, decode_tokens=5)
    assert result["decode_tokens_per_second"] > 0
    # dense: 20 context tokens after prefill; 20 + 9 scored inputs + 5 decoded tokens at the end
    assert result["cache_bytes_peak"] == result["cache_bytes"] * (20 + 9 + 5) // 20
    assert compression_perplexity(model, lambda: DynamicCache(config=model.config), ids, 20, 10, 1)[
        "decode_tokens_per_second"] is None


def test_threads_apply_during_the_run_only(tmp_path, tiny_dir, monkeypatch):
    import torch

    recipe = load_recipe(write_recipe(tmp_path, tiny_dir, experiments=SMALL))
    recipe.model["threads"] = 1
    seen, real = [], runner_module.run_point
    monkeypatch.setattr(runner_module, "run_point", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_recipe(recipe, out=tmp_path / "run", progress=False)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
