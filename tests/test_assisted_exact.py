"""Assisted and speculative decoding give what plain decoding with the same cache gives (issue 16, item 6).

``generate`` verifies draft tokens in one forward; an evicting cache replays that forward row by row in the
``"kvplus"`` attention, each draft row over exactly what plain decoding kept at its step, and commits what
was kept after the last accepted token. Table: strategies x budgets x ``prompt_lookup_num_tokens``, and a
tiny draft model: the tokens are plain greedy's, and so are the logits of every token.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, GptOssConfig, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, Qwen2Config)

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.eviction.cache import other_attention_math

NEW = 12
TOLERANCE = 1e-4  # the step-by-step path (slot storage) and the replay sum in other orders: about 1e-6 apart
# Packed storage: the kept set and scores are plain decoding's, but a draft row sees the drafts before it in full
# precision where plain decoding may already have quantized them (a residual flush): logits about 1e-4 apart.
PACKED_TOLERANCE = 1e-3


def _llama(seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=95,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


@pytest.fixture(scope="module")
def model():
    """The issue's model on "sdpa"; the model hook runs verification forwards on the "kvplus" attention."""
    return hf_kvplus.attach(_llama(0))


@pytest.fixture(scope="module")
def draft():
    """A tiny draft model with other random weights: it proposes mostly wrong tokens."""
    return _llama(1)


def _prompt():
    p = torch.randint(2, 90, (1, 40), generator=torch.Generator().manual_seed(3))
    return torch.cat([p, p[:, :20]], 1)  # repeated text gives prompt lookup something to find


def _generate(model, cache, **mode):
    out = model.generate(
        _prompt(),
        do_sample=False,
        max_new_tokens=NEW,
        output_logits=True,
        return_dict_in_generate=True,
        **cache_kwargs(cache),
        **mode,
    )
    return out.sequences, torch.stack(out.logits, dim=1)  # [1, NEW, vocab]


def _same_as_plain(model, make, tolerance=TOLERANCE, **mode):
    plain_tokens, plain_logits = _generate(model, make())
    tokens, logits = _generate(model, make(), **mode)
    assert torch.equal(tokens, plain_tokens)
    assert (logits - plain_logits).abs().max() <= tolerance


STRATEGIES = {
    "h2o": {},
    "tova": {},
    "snapkv": dict(window=8),
    "keynorm": {},
    "window": {},
    "sink": dict(num_sink_tokens=4, rerotate_keys=False),
    "sink-rerotated": dict(num_sink_tokens=4),
    "h2o-int8": dict(nbits=8, group_size=4, residual_length=4),
}


# Every strategy at two (budget, prompt_lookup_num_tokens) pairs; H2O (the reported case) over the whole grid.
CASES = [(name, budget, lookup) for name in STRATEGIES for budget, lookup in ((16, 3), (32, 5))] + [
    ("h2o", budget, lookup) for budget, lookup in ((16, 2), (16, 5), (32, 2), (32, 3))
]


@pytest.mark.parametrize(("name", "budget", "lookup"), CASES)
@torch.no_grad()
def test_prompt_lookup_gives_plain_greedy(name, budget, lookup, model):
    strategy, kwargs = name.split("-")[0], STRATEGIES[name]
    tolerance = PACKED_TOLERANCE if "nbits" in kwargs else TOLERANCE
    _same_as_plain(
        model,
        lambda: hf_kvplus.make_cache(strategy, model, budget=budget, **kwargs),
        tolerance,
        prompt_lookup_num_tokens=lookup,
    )


@pytest.mark.parametrize("name", ["h2o", "tova", "keynorm", "window"])
@torch.no_grad()
def test_draft_model_gives_plain_greedy(name, model, draft):
    _same_as_plain(
        model,
        lambda: hf_kvplus.make_cache(name, model, budget=24),
        assistant_model=draft,
        num_assistant_tokens=4,
    )


@torch.no_grad()
def test_issue_input():
    """The reported input: h2o at budget 32 with prompt lookup of 3 differed from plain greedy from the 8th token."""
    model = _llama(0)
    plain = model.generate(
        _prompt(),
        do_sample=False,
        max_new_tokens=12,
        **cache_kwargs(hf_kvplus.make_cache("h2o", model, budget=32)),
    )
    assisted = model.generate(
        _prompt(),
        do_sample=False,
        max_new_tokens=12,
        prompt_lookup_num_tokens=3,
        **cache_kwargs(hf_kvplus.make_cache("h2o", model, budget=32)),
    )
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize(("name", "kwargs"), [("sink", dict(num_sink_tokens=4)), ("keynorm", {}), ("window", {})])
@torch.no_grad()
def test_refused_before_anything_changes(name, kwargs):
    """What cannot be verified exactly is refused when assisted decoding starts, before any forward: here a cache
    built from the config, whose model's attention implementation is unknown to it (make_cache(name, model) knows)."""
    model = _llama(0)
    cache = hf_kvplus.make_cache(name, model.config, budget=16, **kwargs)
    match = r"only through the 'kvplus' attention.*the model runs None.*make_cache\(name, model\)"
    with pytest.raises(ValueError, match=match):
        model.generate(
            _prompt(), do_sample=False, max_new_tokens=4, prompt_lookup_num_tokens=3, **cache_kwargs(cache)
        )
    assert cache.get_seq_length() == 0 and not any(layer.record_past for layer in cache.layers)
    plain = model.generate(
        _prompt(), do_sample=False, max_new_tokens=4, **cache_kwargs(cache)
    )  # still usable
    assert plain.shape == (1, 64)


@torch.no_grad()
def test_verification_leaves_the_users_attention_in_place():
    """A sink cache on an "sdpa" model verifies drafts on "kvplus" during those forwards only."""
    model = _llama(0)
    plain = model.generate(_prompt(), do_sample=False, max_new_tokens=8,
                           **cache_kwargs(hf_kvplus.make_cache("sink", model, budget=16, num_sink_tokens=4)))
    assisted = model.generate(_prompt(), do_sample=False, max_new_tokens=8, prompt_lookup_num_tokens=3,
                              **cache_kwargs(hf_kvplus.make_cache("sink", model, budget=16, num_sink_tokens=4)))
    assert torch.equal(assisted, plain) and model.config._attn_implementation == "sdpa"


def _tiny(config_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


# Attention math the row-by-row verification does not replay: refused when assisted decoding starts.
OTHER_MATH = {
    "gemma2-softcap": (Gemma2Config, dict(layer_types=["full_attention"] * 2), r"logit soft-capping \(attn_logit_softcapping=50.0\)"),
    "mistral-sliding": (MistralConfig, dict(sliding_window=64), r"a sliding window \(sliding_window=64\)"),
    "qwen2-sliding": (Qwen2Config, dict(use_sliding_window=True, sliding_window=64), r"sliding_window=64"),
}


@pytest.mark.parametrize("arch", sorted(OTHER_MATH))
@pytest.mark.parametrize("name", ["h2o", "snapkv", "window"])
@torch.no_grad()
def test_other_attention_math_is_refused_before_anything_changes(arch, name):
    config_class, extra, match = OTHER_MATH[arch]
    model = _tiny(config_class, **extra)
    cache = hf_kvplus.make_cache(name, model, budget=16, **STRATEGIES.get(name, {}))
    with pytest.raises(ValueError, match=r"exactly only for plain scaled dot-product attention.*" + match):
        model.generate(_prompt(), do_sample=False, max_new_tokens=4, prompt_lookup_num_tokens=3,
                       **cache_kwargs(cache))
    assert cache.get_seq_length() == 0 and not any(layer.record_past for layer in cache.layers)
    plain = model.generate(_prompt(), do_sample=False, max_new_tokens=4, **cache_kwargs(cache))
    assert plain.shape == (1, 64)  # the cache is still usable for plain decoding


def test_other_attention_math_read_from_configs():
    assert other_attention_math(Qwen2Config()) is None  # no sliding window unless use_sliding_window
    assert other_attention_math(LlamaConfig()) is None
    assert other_attention_math(GptOssConfig()) == "a sliding window (sliding_window=128)"
    assert other_attention_math(GptOssConfig(sliding_window=None)) == "learned attention sinks (gpt-oss)"


@torch.no_grad()
def test_qwen2_without_sliding_window_verifies_exactly():
    """Qwen2 (biased projections, no window by default) is plain attention: assisted equals plain greedy."""
    model = hf_kvplus.attach(_tiny(Qwen2Config))
    _same_as_plain(model, lambda: hf_kvplus.make_cache("h2o", model, budget=16), prompt_lookup_num_tokens=3)


@pytest.mark.parametrize("name", ["h2o", "sink"])
@torch.no_grad()
def test_a_left_padded_row_is_refused_before_anything_changes(name, model):
    cache = hf_kvplus.make_cache(name, model, budget=16, **STRATEGIES.get(name, {}))
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[:, :2] = 0
    with pytest.raises(ValueError, match=r"only for unpadded rows; this prompt is left-padded by \[2\] tokens"):
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4, prompt_lookup_num_tokens=3,
                       **cache_kwargs(cache))
    assert cache.get_seq_length() == 0 and not any(layer.record_past for layer in cache.layers)
    assert model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4,
                          **cache_kwargs(cache)).shape == (1, 64)


@torch.no_grad()
def test_unannounced_other_math_is_refused_by_the_attention():
    """A model whose config does not say its attention has a window (the config check is bypassed here): the
    verification forward is refused by the "kvplus" attention, naming the keyword, and rolled back."""
    model = hf_kvplus.attach(_tiny(MistralConfig, sliding_window=64))
    cache = hf_kvplus.make_cache("h2o", model, budget=16)
    cache.other_attention_math = None
    with pytest.raises(ValueError, match=r"layer 0 passes \['sliding_window'\]"):
        model.generate(_prompt(), do_sample=False, max_new_tokens=4, prompt_lookup_num_tokens=3,
                       **cache_kwargs(cache))
