"""Recipe files and grids: every registered strategy is swept, bad input names what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

import hf_kvplus
from hf_kvplus import registry
from hf_kvplus.eval import expand_grid, load_recipe, packaged_recipes, parse_recipe

ROOT = Path(__file__).resolve().parent.parent


def recipe(**experiment):
    experiment = {"name": "e", "protocol": {"name": "compression", "context_length": 64, "target_length": 8}, **experiment}
    return parse_recipe({"name": "t", "model": "default", "experiments": [experiment]})


@pytest.fixture
def extra_strategy():
    """Registers a throw-away strategy with a default sweep, then removes it."""
    spec = registry.CacheSpec(
        name="test-extra", factory=lambda config, budget=8, knob=1: hf_kvplus.SinkCache(config, budget=budget),
        description="test only", evicting=True, sweep={"knob": (1, 2)},
    )
    hf_kvplus.register_cache(spec)
    yield spec
    registry._REGISTRY.pop(spec.name)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    parsed = load_recipe(path)
    assert parsed.experiments and all(expand_grid(e)[0] for e in parsed.experiments)


def test_packaged_recipes_match_their_top_level_copies():
    assert {"default", "passkey"} <= set(packaged_recipes())
    assert load_recipe(None).source.endswith("hf_kvplus/recipes/default.yaml")
    for name in packaged_recipes():
        assert (ROOT / "recipes" / f"{name}.yaml").read_text() == (ROOT / "hf_kvplus" / "recipes" / f"{name}.yaml").read_text()


def test_the_default_recipe_sweeps_every_registered_strategy(extra_strategy):
    compression = load_recipe("default").experiments[0]
    points, excluded = expand_grid(compression)
    covered = {p.strategy for p in points} | {x["strategy"] for x in excluded}
    assert set(hf_kvplus.list_caches()) <= covered
    extra = [p for p in points if p.strategy == "test-extra"]
    # 2 keep ratios x the strategy's own sweep of 2 values, with budgets from the context length
    assert sorted((p.params["keep_ratio"], p.params["knob"]) for p in extra) == [(0.125, 1), (0.125, 2), (0.5, 1), (0.5, 2)]
    assert {p.cache_kwargs["budget"] for p in extra} == {512, 128}
    assert points[0].strategy == "dynamic" and points[0].settings == "all tokens"


def test_excluded_strategies_are_reported_with_their_reason():
    points, excluded = expand_grid(recipe(keep_ratios=[0.5], exclude={"sink": "not today"}).experiments[0])
    assert "sink" not in {p.strategy for p in points}
    assert {p.strategy for p in points} == set(hf_kvplus.list_caches()) - {"sink"}
    assert excluded == [{"experiment": "e", "strategy": "sink", "reason": "not today"}]


def test_entries_sweep_lists_and_override_protocol_options():
    points, _ = expand_grid(recipe(grid=[{"strategy": "sink", "budget": [8, 16], "num_sink_tokens": [0, 4],
                                          "target_length": 4}]).experiments[0])
    assert len(points) == 4
    assert {p.options["target_length"] for p in points} == {4}
    assert {(p.cache_kwargs["budget"], p.cache_kwargs["num_sink_tokens"]) for p in points} == {(8, 0), (8, 4), (16, 0), (16, 4)}


@pytest.mark.parametrize(
    "experiment, message",
    [
        ({"grid": ["sinks"]}, r"unknown cache 'sinks'; choose one of \[.*'sink'"),
        ({"keep_ratios": [1.5]}, r"bad value 1.5 .*allowed values are numbers > 0 and <= 1"),
        ({"budgets": [0]}, r"bad value 0 .*allowed values are integers > 0"),
        ({"grid": [{"strategy": "sink", "budget": -3}]}, r"bad budget -3 .*integers >= 1"),
        ({"grid": [{"strategy": "sink", "keep_ratio": 2}]}, r"bad keep_ratio 2 .*numbers in \(0, 1\]"),
        ({"grid": [{"strategy": "dynamic", "budget": 8}]}, r"keeps every token, so budget/keep_ratio are not allowed"),
        ({"grid": ["sink"]}, r"an evicting strategy needs a size"),
        ({"protocol": "perplexity"}, r"unknown protocol 'perplexity' in experiments\[0\]; choose one of \['compression', 'cost_of_caching', 'passkey', 'prompt_order', 'streaming'\]"),
        ({"protocol": {"name": "streaming", "chunks": 2}}, r"unknown option\(s\) \['chunks'\] .*allowed: \['chunk_size'"),
        ({"protocol": {"name": "streaming", "chunk_size": 0}}, r"bad value 0 for .*chunk_size: allowed values are integers >= 1"),
        ({"protocol": "streaming", "grid": [{"strategy": "sink", "keep_ratio": 0.5}]}, r"keep_ratio needs a protocol with"),
        ({"grid": ["sink"], "budgets": [8], "exclude": {"sink": "x"}}, r"both lists and excludes strategy 'sink'"),
        ({"colour": 1}, r"unknown field\(s\) \['colour'\] in experiments\[0\]; allowed"),
    ],
)
def test_bad_recipes_name_the_allowed_values(experiment, message):
    with pytest.raises(ValueError, match=message):
        recipe(**experiment)


def test_recipe_level_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['modle'\] in recipe"):
        parse_recipe({"modle": "x", "experiments": [{}]})
    with pytest.raises(ValueError, match="needs experiments"):
        parse_recipe({"name": "x"})
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        parse_recipe({"model": {"id": "default", "dtype": "float7"}, "experiments": [{}]})
    with pytest.raises(ValueError, match="unknown data source 'web'"):
        parse_recipe({"data": {"source": "web"}, "experiments": [{}]})
    with pytest.raises(FileNotFoundError, match=r"neither a file nor a packaged recipe \['cost-of-caching', 'default'"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: [unclosed")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_recipe(bad)
