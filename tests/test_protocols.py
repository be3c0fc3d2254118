"""The eval package as one flow: a protocol is one class, registered once; every protocol (the studies
included) runs through the same runner and run folder; a recipe is validated once, before any model loads."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from test_runner import TEXT, tiny_dir, token_cache  # noqa: F401 - fixtures used by name

from hf_kvplus.eval import (
    PROTOCOLS,
    Metric,
    Option,
    Protocol,
    get_protocol,
    load_recipe,
    models,
    parse_recipe,
    register_protocol,
    run_recipe,
)
from hf_kvplus.eval import runner as runner_module
from hf_kvplus.eval.results import RunFolder

DOCS = Path(__file__).resolve().parents[1] / "docs"


class TokenCount(Protocol):
    """Defined here, in the test file only: counts what the cache holds after a prefill."""

    name = "test-token-count"
    description = "prefill {context_length} tokens through the cache and count what it saw and holds."
    options = {"context_length": Option(32), "repeats": Option(1)}
    metrics = (Metric("tokens the cache has seen", "tokens", "held"),
               Metric("KV cache held after prefill", "MiB", "cache_mib"),
               Metric("half of what it has seen, as a share of the prompt", "share", "kept"))
    keep_ratio_base = "context_length"
    calls: list = []

    def run(self, model, tokenizer, ids, make_cache, options, progress=False):
        from hf_kvplus import cache_nbytes
        from hf_kvplus._compat import cache_kwargs

        cache = make_cache()
        model(ids[None, : options["context_length"]].to(model.device), **cache_kwargs(cache, model))
        held = cache.get_seq_length()
        self.calls.append(options["context_length"])
        return [{"held": held, "kept": held / 2 / options["context_length"], "cache_bytes": cache_nbytes(cache)}
                for _ in range(options["repeats"])]


@pytest.fixture
def token_count():
    register_protocol(TokenCount)
    TokenCount.calls = []
    yield PROTOCOLS["test-token-count"]
    PROTOCOLS.pop("test-token-count")


def tiny_recipe(tmp_path, tiny_dir, experiments):  # noqa: F811
    (tmp_path / "text.txt").write_text(TEXT)
    return {"name": "tiny", "model": tiny_dir, "data": {"path": str(tmp_path / "text.txt")}, "experiments": experiments}


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_a_protocol_defined_in_one_place_runs_through_the_runner(tmp_path, tiny_dir, token_count):  # noqa: F811
    raw = tiny_recipe(tmp_path, tiny_dir, [{"name": "count", "protocol": {"name": "test-token-count"},
                                            "keep_ratios": [0.5], "grid": ["dynamic", "sink"]}])
    result = run_recipe(parse_recipe(raw), out=tmp_path / "run", progress=False)
    assert [(r["strategy"], r["held"], r["status"]) for r in result["rows"]] == [("dynamic", 32, "ok"), ("sink", 32, "ok")]
    assert result["rows"][1]["cache_mib"] < 0.6 * result["rows"][0]["cache_mib"]  # 16 of 32 tokens, plus positions
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "prefill 32 tokens through the cache and count what it saw and holds." in summary  # its description
    assert "| strategy | settings | held | cache_mib | kept | peak RSS MiB |" in summary  # its metric schema
    assert "| sink | keep_ratio=0.5, budget=16 | 32 |" in summary and "| 50% |" in summary  # share as a percentage
    with open(tmp_path / "run" / "results.csv") as handle:
        header = next(csv.reader(handle))
    assert header[:8] == ["experiment", "protocol", "strategy", "settings", "status", "held", "cache_mib", "kept"]
    assert not (tmp_path / "run" / "pareto.png").exists()  # no quality column: nothing to put on a Pareto plot
    again = run_recipe(parse_recipe(raw), out=tmp_path / "run", progress=False)
    assert (again["measured"], again["reused"], TokenCount.calls) == (0, 2, [32, 32])  # resumed: nothing re-run


def test_a_point_with_several_rows_is_finished_only_when_all_are_written(tmp_path, tiny_dir, token_count):  # noqa: F811
    raw = tiny_recipe(tmp_path, tiny_dir, [{"name": "count", "protocol": {"name": "test-token-count", "repeats": 3},
                                            "grid": ["dynamic", "int4"]}])
    rows = run_recipe(parse_recipe(raw), out=tmp_path / "run", progress=False)["rows"]
    assert [(r["strategy"], r["part"], r["parts"]) for r in rows] == [(s, i, 3) for s in ("dynamic", "int4") for i in range(3)]
    jsonl = tmp_path / "run" / "results.jsonl"
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join(lines[:-1]) + "\n")  # the last point lost its last row (a process killed mid-write)
    assert RunFolder(tmp_path / "run").done_keys() == {rows[0]["key"]}
    TokenCount.calls = []
    result = run_recipe(parse_recipe(raw), out=tmp_path / "run", progress=False)
    assert (result["measured"], len(TokenCount.calls), len(result["rows"])) == (1, 1, 6)  # only the cut point again
    assert [r["part"] for r in result["rows"]] == [0, 1, 2, 0, 1, 2]


def test_the_recipe_is_validated_once_before_any_model_loads(tmp_path, tiny_dir, token_count, monkeypatch):  # noqa: F811
    monkeypatch.setattr(models, "load_model_and_tokenizer", no_model)
    bad = {"name": "test-token-count", "context_lenght": 8}
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['context_lenght'] for protocol 'test-token-count'; "
                                                   "allowed: ['context_length', 'repeats']")):
        parse_recipe(tiny_recipe(tmp_path, tiny_dir, [{"protocol": bad, "grid": ["dynamic"]}]))
    with pytest.raises(ValueError, match=r"bad value 0 .*repeats.*integer"):
        parse_recipe(tiny_recipe(tmp_path, tiny_dir, [{"protocol": {"name": "test-token-count", "repeats": 0}}]))
    with pytest.raises(ValueError, match=r"protocol 'compression' needs a cache; 'none' \(no cache\)"):
        parse_recipe(tiny_recipe(tmp_path, tiny_dir, [{"grid": ["none"]}]))
    with pytest.raises(ValueError, match=r"protocol 'prompt_order' takes no grid"):
        parse_recipe(tiny_recipe(tmp_path, tiny_dir, [{"protocol": "prompt_order", "grid": ["dynamic"]}]))
    with pytest.raises(ValueError, match=r"bad value 'random' in .*orderings: allowed values are \['stable_first'"):
        load_recipe("prompt-order", options={"orderings": ["random"]})
    with pytest.raises(ValueError, match=r"option\(s\) \['turns'\] belong to no protocol of this recipe"):
        load_recipe("default", options={"turns": 2})
    with pytest.raises(FileNotFoundError, match=r"data file\(s\) \['.*nowhere.txt'\] do not exist"):
        parse_recipe({**tiny_recipe(tmp_path, tiny_dir, [{"grid": ["dynamic"]}]), "data": {"path": str(tmp_path / "nowhere.txt")}})
    # prompt_order reads no text, so its recipe does not need the data file
    assert parse_recipe({"data": {"path": str(tmp_path / "nowhere.txt")}, "experiments": [{"protocol": "prompt_order"}]})
    # the runner runs the points as parsed: expanding the grid again would fail
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_dir, [{"protocol": {"name": "test-token-count"}, "grid": ["dynamic"]}]))
    monkeypatch.undo()
    monkeypatch.setattr(TokenCount, "points", lambda self, experiment: pytest.fail("grid expanded twice"))
    assert run_recipe(recipe, out=tmp_path / "run", progress=False)["rows"][0]["held"] == 32


def test_registering_a_protocol_checks_it(token_count):
    with pytest.raises(ValueError, match="protocol 'test-token-count' is already registered"):
        register_protocol(type("Other", (TokenCount,), {}))
    with pytest.raises(ValueError, match="reports no metrics"):
        register_protocol(type("Empty", (Protocol,), {"name": "test-empty"}))
    with pytest.raises(TypeError, match="takes a Protocol subclass"):
        register_protocol(object)
    with pytest.raises(ValueError, match=r"unknown protocol 'nope'; choose one of \['compression'"):
        get_protocol("nope")
    assert "test-empty" not in PROTOCOLS


def test_every_protocol_has_a_metric_schema_and_a_description():
    for name, protocol in PROTOCOLS.items():
        assert protocol.name == name and protocol.metrics and protocol.describe(protocol.defaults)
        columns = [m.column for m in protocol.metrics]
        assert len(set(columns)) == len(columns), name
        assert protocol.quality in (None, *columns) and protocol.memory in (None, *columns), name


def test_the_studies_resume_like_any_recipe(tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    recipe = load_recipe("cost-of-caching", options={"new_tokens": [2, 4], "prompt_tokens": 8,
                                                     "no_cache_max_new_tokens": 2})
    calls, real = [], runner_module.run_point
    monkeypatch.setattr(runner_module, "run_point", lambda *a, **k: (calls.append(a[4].key), real(*a, **k))[1])
    first = run_recipe(recipe, out=tmp_path / "cost", model=model, tokenizer=tokenizer, progress=False)
    assert len(calls) == 4 and len(first["rows"]) == 8 and all(r["status"] == "ok" for r in first["rows"])
    none = [r for r in first["rows"] if r["method"] == "no cache"]
    assert [r["measured"] for r in none] == [True, False] and none[1]["seconds"] is None  # beyond the cap: FLOPs only
    monkeypatch.setattr(models, "load_model_and_tokenizer", no_model)
    again = run_recipe(load_recipe("cost-of-caching", options={"new_tokens": [2, 4], "prompt_tokens": 8,
                                                               "no_cache_max_new_tokens": 2}),
                       out=tmp_path / "cost", progress=False)
    assert (len(calls), again["measured"], again["reused"]) == (4, 0, 4)  # no point again, no model loaded
    assert [r["gflops"] for r in again["rows"]] == [r["gflops"] for r in first["rows"]]
    assert (tmp_path / "cost" / "cost.png").read_bytes().startswith(b"\x89PNG")


def test_the_docs_example_protocol_runs(tmp_path, tiny_dir):  # noqa: F811
    page = (DOCS / "recipes.md").read_text()
    section = page.split("## Adding a protocol", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1 and len([line for line in blocks[0].splitlines() if line.strip()]) <= 20
    namespace: dict = {"__name__": "docs_adding_a_protocol"}
    try:
        exec(compile(blocks[0], "docs/recipes.md: adding a protocol", "exec"), namespace)
        raw = tiny_recipe(tmp_path, tiny_dir, [{"name": "speed", "protocol": {"name": "decode_speed", "context_length": 48,
                                                                            "new_tokens": 4},
                                                "keep_ratios": [0.25], "grid": ["dynamic", "sink", "int4"]}])
        with pytest.raises(ValueError, match=r"allowed: \['context_length', 'new_tokens'\]"):
            parse_recipe({**raw, "experiments": [{"protocol": {"name": "decode_speed", "tokens": 4}}]})
        rows = run_recipe(parse_recipe(raw), out=tmp_path / "run", progress=False)["rows"]
    finally:
        PROTOCOLS.pop("decode_speed", None)
    assert [(r["strategy"], r["settings"]) for r in rows] == [("dynamic", "all tokens"), ("sink", "keep_ratio=0.25, budget=12"),
                                                              ("int4", "all tokens")]
    assert all(r["status"] == "ok" and r["decode_tok_s"] > 0 and r["step_ms"] > 0 for r in rows)
    assert rows[1]["cache_mib"] < rows[0]["cache_mib"]  # sink keeps 12 of 52 tokens
    assert "| strategy | settings | decode_tok_s | step_ms | cache_mib |" in (tmp_path / "run" / "summary.md").read_text()


def test_the_command_line_runs_the_studies_as_recipes(tmp_path, monkeypatch, capsys):
    from hf_kvplus.cli import main

    seen = []

    def fake_run(recipe, **kwargs):
        seen.append((recipe.name, recipe.experiments[0].options, kwargs["out"]))
        return {"rows": []}

    monkeypatch.setattr(runner_module, "run_recipe", fake_run)
    assert main(["eval", "prompt-order", "--turns", "3", "--out", str(tmp_path / "o")]) == 0
    assert main(["eval", "cost-of-caching", "--new-tokens", "8", "16"]) == 0
    assert seen[0] == ("prompt-order", {"turns": 3, "orderings": ["stable_first", "variable_first"], "block_size": 16},
                       str(tmp_path / "o"))
    assert seen[1][1]["new_tokens"] == [8, 16] and seen[1][1]["prompt_tokens"] == 32
    saved = load_recipe("prompt-order", options={"turns": 3}).text  # what the run folder keeps: what ran
    assert parse_recipe(yaml.safe_load(saved)).experiments[0].options["turns"] == 3
    assert main(["eval", "passkey", "--new-tokens", "8"]) == 2
    assert "--new-tokens and --turns apply to the studies" in capsys.readouterr().err
    assert yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "prompt-order.yaml").read_text())
    assert json.dumps(seen)  # plain data
