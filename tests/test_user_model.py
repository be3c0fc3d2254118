"""Using a cache never changes what the user's model does beyond the cache (issue 16, item 4).

The user's attention implementation (eager or SDPA) is kept: outputs and returned attention weights are
what ``DynamicCache`` with the same implementation gives while the cache holds the same tokens, and have
the shape of what is held after eviction; the model's implementation is the user's after generation and
after ``detach``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model
from transformers import DynamicCache

import hf_kvplus
from hf_kvplus._compat import attn_implementation, cache_kwargs

PROMPT, NEW, BUDGET = 10, 4, 6
# Every registered strategy (the scoring ones switch attention per forward), "dynamic" excluded: it is the reference.
STRATEGIES = [name for name in hf_kvplus.list_caches() if name != "dynamic"]
KWARGS = {"quantized": dict(nbits=8, group_size=4, residual_length=4), "snapkv": dict(window=2)}  # window < budget: it scores


def _model(implementation: str):
    model = tiny_model("llama-gqa")
    model.set_attn_implementation(implementation)
    return model


def _generate(model, cache, output_attentions: bool):
    return model.generate(prompt(length=PROMPT, seed=1), **cache_kwargs(cache), max_new_tokens=NEW, do_sample=False,
                          output_attentions=output_attentions, return_dict_in_generate=True)


def _make(name: str, model):
    kwargs = dict(KWARGS.get(name, {}))
    if hf_kvplus.get_spec(name).evicting:
        kwargs["budget"] = BUDGET
    return hf_kvplus.make_cache(name, model, **kwargs)


@pytest.mark.parametrize("output_attentions", [False, True], ids=["no-attentions", "attentions"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", STRATEGIES)
@torch.no_grad()
def test_a_cache_keeps_the_users_attention_and_returns_its_weights(name, implementation, output_attentions):
    model = _model(implementation)
    reference = _generate(model, DynamicCache(config=model.config), output_attentions)
    cache = _make(name, model)
    out = _generate(model, cache, output_attentions)
    assert attn_implementation(model) == implementation  # after generation
    if not output_attentions:
        assert out.attentions is None and reference.attentions is None
    elif implementation == "sdpa":  # SDPA returns no weights (transformers warns); neither do we
        assert [list(step) for step in out.attentions] == [list(step) for step in reference.attentions] == [[]] * NEW
    else:
        assert len(out.attentions) == len(reference.attentions) == NEW
        for layer_ours, layer_ref in zip(out.attentions[0], reference.attentions[0], strict=True):  # the prompt
            torch.testing.assert_close(layer_ours, layer_ref, atol=1e-6, rtol=1e-5)
        for step in range(1, NEW):  # one query over what the cache holds plus the new token
            held = PROMPT + step if not hf_kvplus.get_spec(name).evicting else min(BUDGET, PROMPT + step - 1) + 1
            heads = model.config.num_attention_heads
            assert [tuple(w.shape) for w in out.attentions[step]] == [(1, heads, 1, held)] * model.config.num_hidden_layers
            for weights in out.attentions[step]:
                torch.testing.assert_close(weights.sum(-1), torch.ones(1, heads, 1))
    hf_kvplus.detach(model)
    assert attn_implementation(model) == implementation
    again = _generate(model, DynamicCache(config=model.config), output_attentions)  # a later run is the user's again
    assert torch.equal(again.sequences, reference.sequences)
    if output_attentions and implementation == "eager":
        assert all(torch.equal(a, b) for a, b in zip(again.attentions[-1], reference.attentions[-1], strict=True))


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv"])
@torch.no_grad()
def test_scoring_from_eager_weights_keeps_what_sdpa_scoring_keeps(name):
    """The eager scoring attention reports the same attention mass as the SDPA one: same tokens kept."""
    kept = {}
    for implementation in ("eager", "sdpa"):
        model = _model(implementation)
        cache = _make(name, model)
        ids = prompt(length=40, seed=2)
        model(ids[:, :30], **cache_kwargs(cache), use_cache=True)
        for column in range(30, 40):
            model(ids[:, column : column + 1], **cache_kwargs(cache), use_cache=True)
        kept[implementation] = [layer.pos.clone() for layer in cache.layers]
    for eager_pos, sdpa_pos in zip(kept["eager"], kept["sdpa"], strict=True):
        assert torch.equal(eager_pos.sort(dim=-1).values, sdpa_pos.sort(dim=-1).values)


def test_an_implementation_without_a_scoring_variant_is_refused_before_anything_changes():
    model = _model("sdpa")
    model.config._attn_implementation = "flex_attention"  # noqa: SLF001 (what a flex-loaded model reports)
    with pytest.raises(ValueError, match="'flex_attention'.*attn_implementation='sdpa' or 'eager'"):
        hf_kvplus.make_cache("h2o", model, budget=4)
    assert getattr(model, "_hf_kvplus_input_hook", None) is None
    assert attn_implementation(model) == "flex_attention"


@torch.no_grad()
def test_a_failing_forward_leaves_the_users_attention():
    model = _model("eager")
    cache = hf_kvplus.make_cache("h2o", model, budget=4)
    with pytest.raises(IndexError):
        model(torch.full((1, 3), 10_000), **cache_kwargs(cache), use_cache=True)  # token ids out of the vocabulary
    assert attn_implementation(model) == "eager"


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv"])
@torch.no_grad()
def test_eager_scoring_with_left_padding_generates_what_the_row_generates_alone(name):
    """Padding query rows (fully masked in eager's additive mask) add no attention mass."""
    model = _model("eager")
    ids = prompt(batch=2, length=12, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    batch = model.generate(ids, attention_mask=mask, **cache_kwargs(_make(name, model)), max_new_tokens=8,
                           do_sample=False)
    alone = model.generate(ids[:1, 3:], **cache_kwargs(_make(name, model)), max_new_tokens=8, do_sample=False)
    assert batch[0, 12:].tolist() == alone[0, 9:].tolist()


class _Replacing(torch.nn.Module):
    """Stands for a model that re-creates its cache mid-generation (as Phi-3's LongRoPE switch does): it runs the
    real model on a fresh ``DynamicCache`` and returns that one instead of the cache it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, **kwargs):
        for name in ("cache", "past_key_values"):
            if name in kwargs:
                kwargs[name] = DynamicCache(config=self.model.config)
        return self.model(input_ids, **kwargs)


@pytest.mark.parametrize("name", STRATEGIES)
@torch.no_grad()
def test_a_model_that_replaces_the_cache_is_refused(name):
    """Issue 16 item 1, its kind: generation never continues silently on a cache the model put in place of ours."""
    inner = _model("sdpa")
    cache = _make(name, inner)
    wrapper = hf_kvplus.attach(_Replacing(inner))
    with pytest.raises(RuntimeError, match=r"was given a \w+ but returned a DynamicCache: the model replaced"):
        wrapper(prompt(length=PROMPT, seed=1), **cache_kwargs(cache), use_cache=True)
    assert cache.get_seq_length() == 0  # never written: the model ran on its own cache
    # the same wrapper with a DynamicCache, or without a cache, runs as before (nothing to follow)
    wrapper(prompt(length=PROMPT, seed=1), **cache_kwargs(DynamicCache(config=inner.config)), use_cache=True)
    wrapper(prompt(length=PROMPT, seed=1), use_cache=False)
    # and the cache itself still works with the real model
    out = inner(prompt(length=PROMPT, seed=1), **cache_kwargs(cache), use_cache=True)
    assert out.logits.shape[1] == PROMPT and cache.get_seq_length() == PROMPT
