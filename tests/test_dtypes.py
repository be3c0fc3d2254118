"""fp32, bf16 and fp16 on CPU, for every registered cache: a short generate gives finite logits, and the
cache holds keys and values in the model's dtype (or, packed, as uint8 codes plus scales)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model
from test_conformance import BUDGET, EVICTING, NAMES, build

import hf_kvplus
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.memory import held_tensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Storage formats: every registered cache in its own format, plus an eviction strategy over packed storage.
CASES = [pytest.param(name, {}, id=name) for name in NAMES] + [
    pytest.param("h2o", dict(nbits=4, group_size=4, residual_length=4), id="h2o-int4"),
]


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def typed(request):
    return request.param, tiny_model("llama-gqa").to(request.param)


def _kv_tensors(layer) -> list[torch.Tensor]:
    """The tensors a layer uses as keys and values, after dequantization."""
    if hasattr(layer, "store"):  # hf_kvplus layers
        return list(layer.store.get())
    return [layer.keys, layer.values]  # transformers' DynamicLayer


@pytest.mark.parametrize(("name", "storage"), CASES)
@torch.no_grad()
def test_generate_in_every_dtype(name, storage, typed):
    dtype, model = typed
    budget = BUDGET if name in EVICTING else None
    cache = build(name, model, budget) if not storage else hf_kvplus.make_cache(name, model, budget=BUDGET, **storage)
    out = model.generate(prompt(batch=2, length=20), max_new_tokens=6, do_sample=False, **cache_kwargs(cache),
                         return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == (2, 26)
    assert all(torch.isfinite(step).all() for step in out.logits)
    for layer in cache.layers:
        assert all(t.dtype == dtype for t in _kv_tensors(layer))  # attention gets the model's dtype
        if budget is not None:
            assert layer.kept <= budget
    floats = {t.dtype for t in held_tensors(cache) if t.is_floating_point()}
    if storage.get("nbits") or hf_kvplus.get_spec(name).name == "quantized":  # its presets too
        packed = [layer.store.key_codes for layer in cache.layers]
        assert all(codes is not None and codes.dtype == torch.uint8 for codes in packed)
        assert floats <= {dtype, torch.float16, torch.float32}  # residual; fp16 scales; fp32 scores
    else:
        assert dtype in floats and floats <= {dtype, torch.float32}  # KV in the model's dtype; fp32 scores/rope


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@torch.no_grad()
def test_reduced_precision_tracks_float32(dtype):
    """Every strategy in half precision stays close to itself in fp32 (no dtype lost on the way)."""
    ids = prompt(length=20, seed=4)
    model32, model16 = tiny_model("llama-gqa"), tiny_model("llama-gqa").to(dtype)
    for name in EVICTING:
        logits = []
        for model in (model32, model16):
            cache = build(name, model, BUDGET)
            logits.append(model(ids, **cache_kwargs(cache), use_cache=True).logits.float())
            logits[-1] = torch.cat([logits[-1], model(ids[:, :3], **cache_kwargs(cache), use_cache=True).logits.float()], 1)
        torch.testing.assert_close(logits[1], logits[0], atol=0.05, rtol=0.05, msg=name)
