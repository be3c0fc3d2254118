"""The recipe machinery on the embedded model and text (select with ``-m integration``)."""

from __future__ import annotations

import pytest

from hf_kvplus.eval import load_recipe, load_token_ids, parse_recipe, run_recipe

pytestmark = pytest.mark.integration


def test_a_short_default_style_recipe_on_the_embedded_model(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KVPLUS_CACHE", str(tmp_path / "cache"))
    model, tokenizer, ids = default_model
    default = load_recipe("default")
    raw = {"name": "short", "experiments": [
        {"name": "compression", "protocol": {"name": "compression", "context_length": 512, "target_length": 64,
                                             "decode_tokens": 4},
         "keep_ratios": [0.25], "grid": ["dynamic", "sink", "window"]},
    ]}
    result = run_recipe(parse_recipe(raw), out=tmp_path / "run", progress=False, model=model, tokenizer=tokenizer)
    rows = {r["strategy"]: r for r in result["rows"]}
    assert rows["dynamic"]["cache_mib"] == pytest.approx(512 * 46_080 / 2**20)  # fp32 KV of SmolLM2-135M
    assert rows["sink"]["budget"] == rows["window"]["budget"] == 128
    # A quarter of the tokens, in budget + 1 slots, plus the 4 sinks' first keys and their rotate_half (float32)
    assert rows["sink"]["cache_mib"] < (128 + 1 + 4) / 512 * rows["dynamic"]["cache_mib"] * 1.01
    assert rows["dynamic"]["ppl"] < rows["sink"]["ppl"] < rows["window"]["ppl"]
    assert default.data.source == "default" and len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1
    assert load_token_ids(default.data, tokenizer).tolist() == ids.tolist()  # cached ids = a direct tokenization
