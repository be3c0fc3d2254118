"""Packed storage in a left-padded batch: a padded row gets exactly what it gets alone.

KIVI groups keys along tokens and keeps the newest tokens exact, so the groups of a padded row must
start at its first real token and padding must never enter a group's min/max (issue 16, item 3).
Table: every strategy with ``nbits=`` (the quantized cache and every evicting one) x every bit width x
padding shorter than, equal to and longer than a key group: each row's logits at prefill and at every
decoding step equal that row's run alone, within what ``DynamicCache`` itself differs by.
"""

from __future__ import annotations

import pytest
import torch
from test_conformance import EVICTING
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.storage.packed_rows import RowAlignedStore

BUDGET = 16  # the prompts (14 real tokens) plus 8 new ones: eviction at decoding steps, padding first
NEW = 8
# In float64, so that the model itself is batch-invariant to ~1e-15: in float32 a row's key states differ by
# about 1e-6 between a batch and the row alone (DynamicCache logits by 3e-6), and a code that flips at a rounding
# boundary moves a logit by 1e-3 whatever the grouping. What is tested is the grouping, not the model's matmuls.
# The sink cache re-rotates keys with float32 angles, per row in a padded batch (1e-6 apart even unpacked);
# a group holding padding moves logits by about 1e-3.
TOLERANCE = 1e-5


def _wide_llama(layers: int):
    """Large weights (initializer_range=0.2): a key group spanning padding changes the logits by about 1e-3."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval().double()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


@pytest.fixture(scope="module")
def wide():
    return _wide_llama(2)


def _batch(pad: int, length: int = 14):
    ids = torch.randint(2, 90, (2, length), generator=torch.Generator().manual_seed(pad))
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0  # row 1: `length - pad` real tokens after `pad` padding columns
    return ids, mask


def _logits(model, make, ids, mask):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **cache_kwargs(make()),
    )
    return torch.stack(out.logits, dim=1)  # [batch, NEW, vocab]


def _rows_match_alone(model, make, pad):
    ids, mask = _batch(pad)
    batch = _logits(model, make, ids, mask)
    for row, start in ((0, 0), (1, pad)):
        alone = _logits(model, make, ids[row : row + 1, start:], mask[row : row + 1, start:])
        assert (batch[row] - alone[0]).abs().max() <= TOLERANCE, f"row {row}"


# The quantized cache: every bit width x padding shorter than, equal to and longer than a key group (4 tokens);
# every evicting strategy: every bit width, each with one of those paddings.
CASES = [
    pytest.param("quantized", None, nbits, pad, id=f"quantized-int{nbits}-pad{pad}")
    for nbits in (8, 4, 2)
    for pad in (1, 4, 6)
] + [
    pytest.param(name, BUDGET, nbits, pad, id=f"{name}-budget-int{nbits}-pad{pad}")
    for name in EVICTING
    for nbits, pad in ((8, 1), (4, 6), (2, 3))
]


@pytest.mark.parametrize(("name", "budget", "nbits", "pad"), CASES)
@torch.no_grad()
def test_padded_row_gets_what_it_gets_alone(name, budget, nbits, pad, wide):
    storage = dict(nbits=nbits, group_size=4, residual_length=4)
    kwargs = storage if budget is None else dict(storage, budget=budget)
    if name == "snapkv":
        kwargs["window"] = 4  # below the budget, so it scores (the default window of 32 is refused there)
    _rows_match_alone(wide, lambda: hf_kvplus.make_cache(name, wide, **kwargs), pad)


@pytest.mark.parametrize("preset", ["int8", "int4", "int2"])
@torch.no_grad()
def test_presets_with_their_default_groups(preset, wide):
    """The presets' own groups (64 tokens, residual 128): the prompt stays in the exact residual, steps too."""
    _rows_match_alone(wide, lambda: hf_kvplus.make_cache(preset, wide), 3)


@torch.no_grad()
def test_issue_input_residual_zero(wide):
    """The reported input: int4, groups of 2, no residual, a 4-token row and a 3-token row padded by 1."""
    model = _wide_llama(1)
    ids = torch.randint(2, 90, (2, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, 0], mask[1, 0] = 0, 0
    make = lambda: hf_kvplus.make_cache("quantized", model, nbits=4, group_size=2, residual_length=0)  # noqa: E731
    batch = _logits(model, make, ids, mask)
    alone = _logits(model, make, ids[1:, 1:], mask[1:, 1:])
    dense = _logits(model, lambda: DynamicCache(config=model.config), ids, mask)
    dense_alone = _logits(model, lambda: DynamicCache(config=model.config), ids[1:, 1:], mask[1:, 1:])
    assert (dense[1] - dense_alone[0]).abs().max() < TOLERANCE
    assert (batch[1] - alone[0]).abs().max() < TOLERANCE  # was 5.8e-3 with groups starting at the padding


@torch.no_grad()
def test_padded_batch_holds_each_row_in_its_own_store(wide):
    """What the padded batch holds: per row, exactly the real tokens the row alone holds (codes, scales, residual)."""
    ids, mask = _batch(3)
    cache = hf_kvplus.make_cache("quantized", wide, nbits=4, group_size=4, residual_length=4)
    wide.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache))
    alone = hf_kvplus.make_cache("quantized", wide, nbits=4, group_size=4, residual_length=4)
    wide.generate(ids[1:, 3:], max_new_tokens=NEW, do_sample=False, **cache_kwargs(alone))
    for layer, single in zip(cache.layers, alone.layers, strict=True):
        store = layer.store
        assert isinstance(store, RowAlignedStore) and store.pad_held == [0, 3]
        row = store.rows[1]
        assert row.length == single.store.length == 11 + NEW - 1
        assert row.quantized_length == single.store.quantized_length
        assert torch.equal(row.key_codes, single.store.key_codes)
        assert torch.equal(row.key_scale, single.store.key_scale)
        assert torch.allclose(
            row.res_keys, single.store.res_keys, rtol=0, atol=1e-12
        )  # the model's own rounding
        keys, _ = store.get()  # [2, kv_heads, 3 + 18, head_dim]: row 1 starts with its 3 padding columns
        assert keys.shape[2] == 3 + row.length and not keys[1, :, :3].any()
        assert hf_kvplus.cache_nbytes(cache) >= sum(t.numel() * t.element_size() for t in store.tensors())


def _decode_by_hand(model, cache, ids, mask, steps: int, position_ids: bool):
    """Prefill then greedy steps through ``model(...)`` (no generate): next-token logits ``[batch, steps + 1, vocab]``."""
    out = []
    pos = (mask.cumsum(-1) - 1).clamp(min=0) if position_ids else None
    logits = model(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    for _ in range(steps + 1):
        out.append(logits)
        token = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        pos = (mask.cumsum(-1) - 1)[:, -1:] if position_ids else None
        logits = model(token, attention_mask=mask, position_ids=pos, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    return torch.stack(out, dim=1)


@torch.no_grad()
def test_issue_input_decoded_by_hand():
    """The reported input through ``model(...)`` calls: the prefill's next-token logits match the row alone with or
    without position ids (the new tokens are attended at full precision). Later steps read quantized keys, which
    KIVI quantizes after RoPE, so they match when the padded row's tokens sit at the row's own positions, as
    ``generate`` places them (position ids from the mask); without position ids they sit one position later and
    their codes differ (about 1e-3 in the logits, docs/reliability.md)."""
    model = _wide_llama(1)
    ids = torch.randint(2, 90, (2, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, 0], mask[1, 0] = 0, 0
    make = lambda: hf_kvplus.make_cache("quantized", model, nbits=4, group_size=2, residual_length=0)  # noqa: E731
    dense = lambda: DynamicCache(config=model.config)  # noqa: E731
    for position_ids in (True, False):
        gaps = []  # [steps + 1] per cache: the padded row against the row alone
        for factory in (make, dense):
            batch = _decode_by_hand(model, factory(), ids, mask, 3, position_ids)
            alone = _decode_by_hand(model, factory(), ids[1:, 1:], mask[1:, 1:], 3, position_ids)
            gaps.append((batch[1] - alone[0]).abs().amax(dim=-1))
        ours, reference = gaps  # DynamicCache: RoPE at shifted positions is relative only up to float32 angles
        assert ours[0] <= reference[0] + 1e-12
        if position_ids:
            assert ours.max() < 1e-12
        else:  # the documented difference: post-RoPE codes at shifted positions
            assert ours[1:].max() > 1e-4 > reference.max()
