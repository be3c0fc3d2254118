"""Degenerate settings (issue 16 item 7): a setting under which a strategy silently becomes another, simpler one is
refused (``ValueError`` naming the values and what is allowed, before the model is touched) or warned about when the
cache is built. One table over every registered strategy and preset; the boundary settings next to each pass quietly.
"""

from __future__ import annotations

import warnings

import pytest
from conftest import tiny_model

import hf_kvplus
from hf_kvplus._compat import attn_implementation

CONTEXT = 1024  # max_position_embeddings of the tiny models (tests/conftest.py)
# name -> [(make_cache keywords, "refuse" or "warn", what the message says)]: degenerate settings of each strategy.
DEGENERATE = {
    "snapkv": [
        ({"budget": 32}, "refuse", r"budget=32 .* at or below its observation window \(window=32\).*plain window"),
        ({"budget": 16}, "refuse", r"at or below its observation window.*Allowed: budget > window"),
        ({"budget": 36, "num_sink_tokens": 4}, "refuse", r"at or below its observation window.*plain sink cache"),
        ({"budget": 16, "window": 4, "recent_window": 16}, "refuse", r"keeps no token by score.*plain window"),
    ],
    "h2o": [
        ({"budget": 8, "heavy_ratio": 0.0}, "refuse", r"budget=8.*recent_window=8 \(heavy_ratio=0.0\) keeps no token"),
        ({"budget": 8, "num_sink_tokens": 2, "recent_window": 6}, "refuse", r"keeps no token by score.*plain sink"),
    ],
    "tova": [({"budget": 8, "recent_window": 8}, "refuse", r"keeps no token by score.*make_cache\('window'")],
    "expected": [  # 4 sinks by default: a small budget is all sinks and recent tokens
        ({"budget": 5}, "refuse", r"budget=5, num_sink_tokens=4 and recent_window=1.*keeps no token.*plain sink"),
        ({"budget": 8, "heavy_ratio": 0.5}, "refuse", r"keeps no token by score.*plain sink"),
    ],
    "keynorm": [({"budget": 1, "heavy_ratio": 0.4}, "refuse", r"keeps no token by score")],  # rounds to 0 heavy
    "sink": [({"budget": 4, "num_sink_tokens": 4}, "refuse", r"budget \(4\) must be larger than num_sink_tokens")],
    "quantized": [({"nbits": 4, "group_size": 64, "residual_length": 1024}, "warn", r"quantizes nothing.*<= 1024")],
    "int8": [({"group_size": 128, "residual_length": 1024}, "warn", r"residual_length=1024 and group_size=128")],
    "int4": [({"group_size": 32, "residual_length": 1024}, "warn", r"every token stays in full precision")],
    "int2": [({"group_size": 32, "residual_length": 2048}, "warn", r"max_position_embeddings=1024")],
    "k4v2": [({"group_size": 64, "residual_length": 1024}, "warn", r"quantizes nothing")],
    # 4 sinks come first: 4 + 960 + 64 tokens are needed before the first flush.
    "int2r": [({"group_size": 64, "residual_length": 960}, "warn", r"sinks=4.*quantizes nothing")],
    "int2rp": [({"group_size": 64, "residual_length": 960}, "warn", r"sinks=4.*quantizes nothing")],
    "prefix": [({"store": "block_size=2048"}, "warn", r"block_size=2048 shares nothing.*block_size <= 1024")],
}
# name -> the closest settings that are not degenerate (no error, no warning).
BOUNDARY = {
    "snapkv": [{"budget": 33}, {"budget": 37, "num_sink_tokens": 4}, {"budget": 16, "window": 4}],
    "h2o": [{"budget": 8, "heavy_ratio": 0.2}, {"budget": 8, "num_sink_tokens": 2, "recent_window": 5}],
    "tova": [{"budget": 8, "recent_window": 7}],
    "expected": [{"budget": 6}, {"budget": 8, "heavy_ratio": 0.6}],
    "keynorm": [{"budget": 1, "heavy_ratio": 0.6}],
    "sink": [{"budget": 5, "num_sink_tokens": 4}],
    "quantized": [{"nbits": 4, "group_size": 64, "residual_length": 960}],
    "int8": [{"group_size": 128, "residual_length": 896}],
    "int4": [{"group_size": 32, "residual_length": 992}],
    "int2": [{}],
    "k4v2": [{"group_size": 64, "residual_length": 896}],
    "int2r": [{"group_size": 64, "residual_length": 896}],
    "int2rp": [{"group_size": 64, "residual_length": 896}],
    "prefix": [{"store": "block_size=1024"}],
}
# Registered names with no degenerate setting of their own, and why.
NONE = {
    "dynamic": "no settings",
    "window": "the sink cache without sinks by design (num_sink_tokens=0), documented as such",
}


def _kwargs(options: dict) -> dict:
    if "store" in options:
        return {**options, "store": hf_kvplus.PrefixStore(block_size=int(options["store"].split("=")[1]))}
    return options


def _touched(model) -> tuple:
    """What make_cache may change on the model: its attention implementation and forward hooks."""
    return attn_implementation(model), len(model._forward_pre_hooks), len(model._forward_hooks)


def test_the_table_covers_every_registered_strategy_and_preset():
    names = set(hf_kvplus.list_caches()) | set(hf_kvplus.list_presets())
    assert set(DEGENERATE) | set(NONE) == names
    assert set(BOUNDARY) == set(DEGENERATE)


@pytest.mark.parametrize(
    ("name", "options", "outcome", "message"),
    [pytest.param(name, *case, id=f"{name}-{i}") for name, cases in DEGENERATE.items() for i, case in enumerate(cases)],
)
def test_a_degenerate_setting_is_refused_before_the_model_changes_or_warned(name, options, outcome, message):
    model = tiny_model()
    assert model.config.max_position_embeddings == CONTEXT
    before = _touched(model)
    if outcome == "refuse":
        with pytest.raises(ValueError, match=message):
            hf_kvplus.make_cache(name, model, **_kwargs(options))
        assert _touched(model) == before  # refused before attach: the model is as it was
        with pytest.raises(ValueError, match=message):  # the same without a model
            hf_kvplus.make_cache(name, model.config, **_kwargs(options))
    else:
        with pytest.warns(UserWarning, match=message):
            cache = hf_kvplus.make_cache(name, model, **_kwargs(options))
        assert cache is not None


@pytest.mark.parametrize(
    ("name", "options"),
    [pytest.param(name, options, id=f"{name}-{i}") for name, cases in BOUNDARY.items() for i, options in enumerate(cases)],
)
def test_the_settings_next_to_a_degenerate_one_pass_quietly(name, options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert hf_kvplus.make_cache(name, tiny_model(), **_kwargs(options)) is not None


def test_snapkv_past_its_window_keeps_tokens_by_score():
    """The refusal's boundary is real: one token more than the window leaves one token chosen by score."""
    cache = hf_kvplus.make_cache("snapkv", tiny_model().config, budget=33)
    assert (cache.recent_window, cache.heavy_budget) == (32, 1)
