"""``backend="quanto"``: optimum-quanto kernels on the same storage layout, or a clear install hint."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import prompt, tiny_model

import hf_kvplus
import hf_kvplus.quant.quanto as quanto_kernels
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.storage.packed import QuantizedStore
from hf_kvplus.quant import pack, unpack

needs_quanto = pytest.mark.skipif(importlib.util.find_spec("optimum.quanto") is None,
                                  reason='needs optimum-quanto (pip install "hf_kvplus[quanto]"; installed by make)')


@needs_quanto
@pytest.mark.parametrize("nbits", [8, 4, 2])
def test_quanto_kernels_match_ours_bit_for_bit(nbits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**nbits, (2, 3, 7, 16), generator=g, dtype=torch.uint8)
    assert torch.equal(quanto_kernels.quanto_unpack(pack(codes, nbits), nbits), codes)
    keys, values = torch.randn(2, 3, 150, 16, generator=g), torch.randn(2, 3, 150, 16, generator=g)
    ours, theirs = QuantizedStore(nbits, 16, 32), QuantizedStore(nbits, 16, 32, backend="quanto")
    for store in (ours, theirs):
        store.append(keys, values)
        store.keep(torch.arange(150).view(1, 1, 150).expand(2, 3, 150)[..., 1::2].contiguous())
    for a, b in zip(ours.tensors(), theirs.tensors()):
        assert torch.equal(a, b)
    assert torch.equal(unpack(theirs.key_codes, nbits), unpack(ours.key_codes, nbits))


@needs_quanto
@torch.no_grad()
def test_quanto_backend_generates_like_the_torch_backend():
    model = tiny_model("qwen2-mqa")
    ids = prompt(batch=2, length=20, seed=2)
    outputs = [
        model.generate(ids, max_new_tokens=12, do_sample=False, num_beams=2,
                       **cache_kwargs(hf_kvplus.make_cache("int4", model, group_size=4, residual_length=4, backend=b)))
        for b in ("torch", "quanto")
    ]
    assert torch.equal(*outputs)


def test_missing_quanto_names_the_pip_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(quanto_kernels.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("optimum") else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install "hf_kvplus\[quanto\]"'):
        hf_kvplus.make_cache("int4", tiny_model("llama-gqa"), backend="quanto")
