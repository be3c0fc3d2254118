"""Every generation mode ``model.generate`` offers, for every registered cache (the conformance suite
covers greedy, sampling, beam search, left padding, chunked prefill and plain continuation).

Here: beam search returning several sequences, assisted decoding with an assistant model and with
prompt lookup (both crop the cache after every step), ``return_dict_in_generate`` with scores,
continuing from a cache returned by assisted decoding, and the modes a cache must refuse with a
clear error instead of producing wrong text (rolling back evicted tokens, right padding, another
batch size).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, prompt, tiny_model
from test_conformance import BUDGET, CASES, EVICTING, NAMES, build
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import hf_kvplus
from hf_kvplus._compat import cache_kwargs, output_cache


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama-gqa")


@pytest.fixture(scope="module")
def assistant():
    """A tiny model with the same vocabulary but other random weights: it proposes mostly wrong tokens."""
    torch.manual_seed(1)
    model = ARCHITECTURES["llama-gqa"]().eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


def _reference(model, ids, **kwargs):
    return model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), **kwargs)


def _check_budget(cache, budget, out):
    assert cache.get_seq_length() == out.shape[1] - 1
    if budget is not None:
        assert max(layer.kept for layer in cache.layers) <= budget


@pytest.mark.parametrize(("name", "budget"), CASES)
@torch.no_grad()
def test_beam_search_returning_several_sequences(name, budget, llama):
    ids = prompt(length=16, seed=7)
    mode = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=12)
    cache = build(name, llama, budget)
    out = llama.generate(ids, **cache_kwargs(cache), **mode)
    assert out.shape == (2, 28)
    assert not torch.equal(out[0], out[1])  # two different hypotheses, not one repeated
    if budget is None:
        assert torch.equal(out, _reference(llama, ids, **mode))
    else:
        assert cache.max_held <= budget


ASSISTED = {
    "assistant-model": lambda assistant: dict(assistant_model=assistant, num_assistant_tokens=4),
    "prompt-lookup": lambda assistant: dict(prompt_lookup_num_tokens=3),
}


@pytest.mark.parametrize("how", list(ASSISTED))
@pytest.mark.parametrize(("name", "budget"), CASES)
@torch.no_grad()
def test_assisted_decoding_crops_and_keeps_the_budget(name, budget, how, llama, assistant):
    hf_kvplus.attach(llama, attention_scores=True)  # evicting caches verify drafts in the "kvplus" attention
    ids = prompt(length=20, seed=2).repeat(1, 2)  # repeated text gives prompt lookup something to find
    mode = dict(do_sample=False, max_new_tokens=16, **ASSISTED[how](assistant))
    cache = build(name, llama, budget)
    if name == "expected":  # its scores are not replayed draft by draft: refused before anything changes
        with pytest.raises(ValueError, match="verifies draft tokens.*expected-attention scores"):
            llama.generate(ids, **cache_kwargs(cache), **mode)
        assert cache.get_seq_length() == 0
        return
    out = llama.generate(ids, **cache_kwargs(cache), **mode)
    assert out.shape == (1, 56)
    _check_budget(cache, budget, out)
    if budget is None:  # crops rolled back exactly the rejected tokens: the text is the dense cache's
        assert torch.equal(out, _reference(llama, ids, **mode))
        assert torch.equal(out, _reference(llama, ids, do_sample=False, max_new_tokens=16))
    else:  # drafts were verified as plain decoding runs them: the text is plain greedy's with the same cache
        plain = llama.generate(ids, **cache_kwargs(build(name, llama, budget)), do_sample=False, max_new_tokens=16)
        assert torch.equal(out, plain)


class HeldProbe(LogitsProcessor):
    """Records the most tokens any layer holds after each forward of ``generate``."""

    def __init__(self, cache):
        self.cache, self.held = cache, []

    def __call__(self, input_ids, scores):
        self.held.append(max(layer.kept for layer in self.cache.layers))
        return scores


@pytest.mark.parametrize("name", EVICTING)
@torch.no_grad()
def test_continuing_after_assisted_decoding_keeps_the_budget(name, llama):
    """Assisted decoding leaves eviction deferred in the cache it returns; the next forward without a crop ends that."""
    ids = prompt(length=20, seed=2).repeat(1, 2)
    cache = build(name, llama, BUDGET)
    if name == "expected":  # refused before it starts (see test_assisted_decoding_crops_and_keeps_the_budget)
        with pytest.raises(ValueError, match="verifies draft tokens"):
            llama.generate(ids, **cache_kwargs(cache), do_sample=False, max_new_tokens=8, prompt_lookup_num_tokens=3)
        return
    out = llama.generate(ids, **cache_kwargs(cache), do_sample=False, max_new_tokens=8, prompt_lookup_num_tokens=3)
    assert all(layer.record_past for layer in cache.layers)
    probe = HeldProbe(cache)
    more = llama.generate(out, **cache_kwargs(cache), do_sample=False, max_new_tokens=20,
                          logits_processor=LogitsProcessorList([probe]))
    assert more.shape[1] == out.shape[1] + 20 and len(probe.held) == 20
    # The first forward may still be recorded (nothing tells it apart from a verification step) ...
    assert probe.held[0] <= BUDGET + 1  # out.shape[1] - 1 tokens were cached: one new token
    assert probe.held[1:] == [BUDGET] * 19  # ... every later one evicts again
    assert not any(layer.record_past for layer in cache.layers)
    # ... and assisted decoding can start again from there (transformers then feeds the whole input again)
    llama.generate(more, **cache_kwargs(cache), do_sample=False, max_new_tokens=8, prompt_lookup_num_tokens=3)
    assert all(layer.record_past for layer in cache.layers)
    assert max(layer.kept for layer in cache.layers) == BUDGET


@pytest.mark.parametrize(("name", "budget"), CASES)
@torch.no_grad()
def test_return_dict_in_generate_with_scores(name, budget, llama):
    ids = prompt(batch=2, length=14, seed=9)
    cache = build(name, llama, budget)
    out = llama.generate(ids, **cache_kwargs(cache), do_sample=False, max_new_tokens=10, return_dict_in_generate=True,
                         output_scores=True, output_logits=True)
    assert output_cache(out) is cache
    assert out.sequences.shape == (2, 24)
    assert len(out.scores) == len(out.logits) == 10
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        assert scores.shape == logits.shape == (2, llama.config.vocab_size)
        assert torch.isfinite(logits).all()
        assert torch.equal(scores.argmax(-1), out.sequences[:, 14 + step])  # greedy picked the best score
    plain = llama.generate(ids, **cache_kwargs(build(name, llama, budget)), do_sample=False, max_new_tokens=10)
    assert torch.equal(out.sequences, plain)
    _check_budget(cache, budget, out.sequences)


# ------------------------------------------------------------------ refused modes
def _newest_kept(cache) -> int:
    """How many of the newest tokens every layer, row and head still holds."""
    seen, newest = cache.get_seq_length(), []
    for layer in cache.layers:
        pos = layer.pos.reshape(-1, layer.pos.shape[-1])  # [rows * heads or 1, kept]
        n = 0
        while n < seen and bool((pos == seen - 1 - n).any(dim=-1).all()):
            n += 1
        newest.append(n)
    return min(newest)


@pytest.mark.parametrize("name", EVICTING)
@torch.no_grad()
def test_rolling_back_evicted_tokens_is_refused_and_changes_nothing(name, llama):
    cache = build(name, llama, BUDGET)
    llama(prompt(length=30), **cache_kwargs(cache), use_cache=True)  # no past recording: eviction is immediate
    held = _newest_kept(cache)  # below BUDGET unless every kept token is among the newest (a pure window)
    before = [(layer.kept, layer.pos.clone()) for layer in cache.layers]
    with pytest.raises(ValueError, match=rf"crop\(-{held + 1}\).*already evicted.*budget {BUDGET}"):
        cache.crop(-(held + 1))  # the newest held + 1 include an evicted token: rolling back would be wrong
    assert cache.get_seq_length() == 30
    for layer, (kept, pos) in zip(cache.layers, before, strict=True):
        assert layer.kept == kept and torch.equal(layer.pos, pos)
    with pytest.raises(ValueError, match=r"crop\(3\).*negative count"):
        cache.crop(3)
    if held:
        cache.crop(-held)  # tokens still held roll back
        assert cache.get_seq_length() == 30 - held
        assert all(layer.kept == BUDGET - held and bool((layer.pos < 30 - held).all()) for layer in cache.layers)


@pytest.mark.parametrize("name", EVICTING)
@torch.no_grad()
def test_right_padding_is_refused(name, llama):
    ids = prompt(batch=2, length=16)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with pytest.raises(ValueError, match="left padding only.*padding_side='left'"):
        llama.generate(ids, attention_mask=mask, max_new_tokens=4, **cache_kwargs(build(name, llama, BUDGET)))


@pytest.mark.parametrize("name", [name for name in NAMES if name != "dynamic"])  # DynamicCache is transformers'
@torch.no_grad()
def test_a_different_batch_size_is_refused(name, llama):
    cache = build(name, llama, BUDGET if name in EVICTING else None)
    llama(prompt(batch=2, length=8), **cache_kwargs(cache), use_cache=True)
    with pytest.raises(ValueError, match=r"holds \[batch=2.*but received .* of shape \(3, "):
        llama(prompt(batch=3, length=1), **cache_kwargs(cache), use_cache=True)
