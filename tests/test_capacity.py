"""Capacity planning (``kvplus memory``), the cost of not caching and the prompt-order study, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, prompt, save_tiny, tiny_model

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.cli import main
from hf_kvplus.eval.generation_cost import forward_flops, generation_cost, generation_flops
from hf_kvplus.planner import load_config, plan

PLANNED = [("dynamic", {}), ("int8", {}), ("int4", {}), ("int2", {}), ("quantized", {"nbits": 4, "group_size": 8,
           "residual_length": 16}), ("sink", {"budget": 20}), ("window", {"budget": 20}), ("h2o", {"budget": 20}),
           ("tova", {"budget": 20}), ("keynorm", {"budget": 20}), ("snapkv", {"budget": 20, "window": 4}),
           ("sink", {"budget": 200})]


@pytest.mark.parametrize("name,kwargs", PLANNED, ids=[f"{n}-{k}" for n, k in PLANNED])
def test_predicted_bytes_equal_cache_nbytes(arch, name, kwargs):
    """Prediction and measurement share no code path but the classes: a real cache after generate must hold
    exactly the predicted bytes (every storage counted by cache_nbytes)."""
    model = tiny_model(arch)
    if arch == "gpt-neox" and name in ("int8", "int4", "int2"):
        kwargs = {**kwargs, "group_size": 16}  # head_dim 16: value groups of 16 channels
    cache = hf_kvplus.make_cache(name, model, **kwargs)
    ids = prompt(batch=2, length=150 - 7)
    model.generate(ids, **cache_kwargs(cache), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    seen = cache.get_seq_length()
    assert seen == 150
    if name == "dynamic":
        layers = len(cache.layers)
        predicted = layers * hf_kvplus.DenseStore().predict_nbytes(2, cache.layers[0].keys.shape[1], seen,
                                                                   cache.layers[0].keys.shape[-1], torch.float32)
    else:
        predicted = hf_kvplus.make_cache(name, model.config, **kwargs).predict_nbytes(seen, batch=2, dtype=torch.float32)
    assert predicted == hf_kvplus.cache_nbytes(cache)


def test_prefix_prediction_matches_a_shared_batch():
    model = tiny_model("llama-gqa")
    store = hf_kvplus.PrefixStore(max_bytes=None)
    shared = prompt(length=40, seed=1)
    first = store.cache_for(model, torch.cat([shared, prompt(length=8, seed=2)], dim=1))
    model.generate(torch.cat([shared, prompt(length=8, seed=2)], dim=1), **cache_kwargs(first), max_new_tokens=1)
    first.release()
    batch = torch.cat([shared.expand(3, -1), prompt(batch=3, length=10, seed=3)], dim=1)  # [3, 50]
    cache = store.cache_for(model, batch)
    assert cache.shared_length == 32
    model.generate(batch, **cache_kwargs(cache), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    predicted = cache.predict_nbytes(cache.get_seq_length(), batch=3, dtype=torch.float32, shared=40)
    measured = hf_kvplus.cache_nbytes(cache)
    # The shared 32 tokens are views of the first request's 48-token buffer, which cache_nbytes counts whole
    # (the store holds it anyway): exactly the 16 tokens beyond the shared prefix, in every layer.
    beyond = len(cache.layers) * hf_kvplus.DenseStore().predict_nbytes(1, 2, 48 - 32, 16, torch.float32)
    assert measured == predicted + beyond


def test_plan_reads_the_registry_and_gqa(tmp_path):
    folder = save_tiny(tmp_path / "tiny", "qwen2-mqa")
    report = plan(load_config(folder), context=4096, batch=2, dtype="fp32", budget=256, prefix=100)
    per = report["bytes_per_token"]
    assert per["dense"] == 2 * 3 * 1 * 16 * 4 and per["full_mha"] == 4 * per["dense"]
    assert report["gqa_saving"] == 0.75
    rows = {(r["strategy"], r["settings"]): r for r in report["rows"]}
    assert rows[("dynamic", "every token")]["bytes"] == per["dense"] * 4096 * 2
    strategies = {r["strategy"] for r in report["rows"]}
    assert set(hf_kvplus.list_caches()) <= strategies  # every registered strategy, prefix included
    sink = next(r for r in report["rows"] if r["strategy"] == "sink")
    assert sink["tokens_held"] == 256 and sink["vs_dense"] < 256 / 4096 * 1.1
    bits = [r["bytes"] for r in report["rows"] if r["strategy"] == "quantized"]
    assert bits == sorted(bits, reverse=True) and len(bits) == 3


def test_memory_cli(tmp_path, capsys):
    folder = save_tiny(tmp_path / "tiny")
    assert main(["memory", folder, "--context", "1000", "--batch", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["context"] == 1000 and report["model"]["kv_heads"] == 2
    assert main(["memory", str(tmp_path / "tiny" / "config.json"), "--context", "10"]) == 0
    assert "grouped-query attention already saves 50%" in capsys.readouterr().out
    for argv, message in [
        ([folder, "--context", "-5"], "context must be an integer >= 1, got -5"),
        ([folder, "--context", "5", "--dtype", "int3"], "unknown dtype 'int3'"),
        ([str(tmp_path / "missing"), "--context", "5"], "cannot be read from the Hub"),
        ([str(tmp_path), "--context", "5"], "without config.json"),
        ([folder, "--context", "5", "--prefix", "9"], "prefix (9) must not exceed context (5)"),
    ]:
        assert main(["memory", *argv]) == 2
        assert message in capsys.readouterr().err


def test_flops_are_quadratic_without_cache_and_linear_with():
    config = tiny_model("llama-gqa").config
    with_cache = [generation_flops(config, 16, n, True) for n in (64, 128, 256)]
    without = [generation_flops(config, 16, n, False) for n in (64, 128, 256)]
    # a cached step costs about the same at any length: doubling N about doubles the work
    assert 1.9 < with_cache[1] / with_cache[0] < 2.3 and 1.9 < with_cache[2] / with_cache[1] < 2.3
    # without a cache, step i re-runs P + i tokens: doubling N about quadruples the work
    assert 3.3 < without[1] / without[0] < 4.3 and 3.5 < without[2] / without[1] < 4.3
    assert generation_flops(config, 16, 1, False) == generation_flops(config, 16, 1, True) == forward_flops(config, 16)
    budgeted = generation_flops(config, 16, 64, True, budget=32) - generation_flops(config, 16, 63, True, budget=32)
    assert budgeted == forward_flops(config, 1, 32)  # the 64th token attends to the 32 kept keys and itself
    # one token attending to 10 keys: projections + MLP + attention of every layer, plus the LM head
    h, layers = 64, 2
    linear = 2 * h * 64 + 4 * h * 32 + 2 * 64 * h + 2 * 3 * h * 128
    assert forward_flops(config, 1, 9) == layers * (linear + 4 * 64 * 10) + 2 * h * VOCAB


def test_generation_cost_rows():
    model = tiny_model("llama-gqa")
    methods = {"no cache": None, "dynamic": lambda: hf_kvplus.make_cache("dynamic", model),
               "sink": lambda: hf_kvplus.make_cache("sink", model, budget=8)}
    rows = generation_cost(model, prompt(length=8), methods, new_tokens=(4, 8, 16), no_cache_max_new_tokens=8)
    assert len(rows) == 9
    none = [r for r in rows if r["method"] == "no cache"]
    assert [r["measured"] for r in none] == [True, True, False] and none[2]["seconds"] is None
    assert all(r["measured"] and r["seconds"] > 0 for r in rows if r["method"] != "no cache")
    for n in (4, 8, 16):
        here = {r["method"]: r for r in rows if r["new_tokens"] == n}
        assert here["no cache"]["gflops"] > here["dynamic"]["gflops"] >= here["sink"]["gflops"]
    # past its budget of 8 tokens the sink cache attends to fewer keys than DynamicCache
    assert [r["gflops"] for r in rows if r["method"] == "sink"][2] < [r["gflops"] for r in rows
                                                                      if r["method"] == "dynamic"][2]
    with pytest.raises(ValueError, match="new_tokens must be integers >= 1"):
        generation_cost(model, prompt(length=8), methods, new_tokens=(0,))


def test_time_generation_generates_exactly_n_tokens():
    from hf_kvplus.eval.generation_cost import time_generation

    model = tiny_model("llama-gqa")
    times = time_generation(model, prompt(length=8), 12, use_cache=False)
    assert len(times) == 12 and times == sorted(times)


def test_prompt_order_reuse(tmp_path):
    from transformers import AutoTokenizer

    from hf_kvplus.eval.prompt_order import _encode, agent_segments, prompt_order

    tokenizer = AutoTokenizer.from_pretrained(save_tiny(tmp_path / "tiny"))
    rows = prompt_order(tiny_model("llama-gqa"), tokenizer, turns=3)
    good = [r for r in rows if r["ordering"] == "stable_first"]
    bad = [r for r in rows if r["ordering"] == "variable_first"]
    assert [r["reused_tokens"] for r in bad] == [0, 0, 0]  # the timestamp heads the prompt: nothing ever matches
    assert [r["prefill_tokens"] for r in bad] == [r["prompt_tokens"] for r in bad]
    assert good[0]["reused_tokens"] == 0
    prompts = [_encode(tokenizer, s)[0].tolist() for s in agent_segments(3, "stable_first")]
    for turn in (1, 2):  # every whole block the previous prompt shares with this one is reused
        before, now = prompts[turn - 1], prompts[turn]
        common = next(i for i, (a, b) in enumerate(zip(before, now)) if a != b)
        assert common >= len(before) - len("Assistant:")  # only the previous "Assistant:" cue differs
        assert good[turn]["reused_tokens"] == common // 16 * 16 > 0
        assert good[turn]["prefill_tokens"] == len(now) - good[turn]["reused_tokens"]
    with pytest.raises(ValueError, match="ordering must be one of"):
        agent_segments(2, "random")


def test_studies_run_through_the_runner_into_a_run_folder(tmp_path, capsys):
    from transformers import AutoTokenizer

    from hf_kvplus.eval import load_recipe, run_recipe

    tokenizer = AutoTokenizer.from_pretrained(save_tiny(tmp_path / "tiny"))
    model = tiny_model("llama-gqa")
    cost_recipe = load_recipe("cost-of-caching", options={"new_tokens": [4, 8], "prompt_tokens": 8,
                                                          "no_cache_max_new_tokens": 4})
    cost = run_recipe(cost_recipe, out=tmp_path / "cost", model=model, tokenizer=tokenizer, progress=False)
    order = run_recipe(load_recipe("prompt-order", options={"turns": 2}), out=tmp_path / "order", model=model,
                       tokenizer=tokenizer, progress=False)
    for result, plot in ((cost, "cost.png"), (order, "prompt_order.png")):
        names = sorted(p.name for p in result["folder"].iterdir())
        assert names == sorted(["results.jsonl", "results.csv", "summary.md", "recipe.yaml", plot])
        saved = [json.loads(line) for line in (result["folder"] / "results.jsonl").read_text().splitlines()]
        assert saved == json.loads(json.dumps(result["rows"], default=str))
    assert [(r["method"], r["new_tokens"]) for r in cost["rows"]] == [
        (m, n) for m in ("no cache", "dynamic", "sink budget=256", "int4") for n in (4, 8)]
    assert [r["turn"] for r in order["rows"]] == [1, 2, 1, 2]
    summary = (tmp_path / "cost" / "summary.md").read_text()
    assert "| no cache | 8 |  |" in summary and "FLOPs no cache / dynamic" in summary
    assert "| 2 | variable_first |" in (tmp_path / "order" / "summary.md").read_text()
    assert main(["eval", "default", "--turns", "3"]) == 2
    assert "--new-tokens and --turns apply to the studies" in capsys.readouterr().err


@pytest.mark.integration
def test_memory_of_the_embedded_model_reads_only_its_config():
    report = plan(load_config("default"), context=2048, batch=1, dtype="bf16")
    assert report["bytes_per_token"] == {"dense": 23_040, "full_mha": 69_120}  # 2 x 30 x 3 x 64 x 2 bytes
    assert report["rows"][0]["bytes"] == 23_040 * 2048
