"""The compiled dequantization of packed storage (issue 15): one inductor pass equal to the eager hot path for every
bit width, dtype and group layout, one graph for a whole generation, a clean fallback, and a validated option.

Each row of CASES compiles one kernel (a few seconds on CPU), so the table picks rows that together cover every
bit width, both group layouts (value groups inside a head and the whole head), odd prompt lengths and the dtypes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model
from torch._dynamo.utils import counters

import hf_kvplus
from hf_kvplus.quant import compiled
from hf_kvplus.quant.fused import DequantScratch
from hf_kvplus.storage.packed import QuantizedStore

# (nbits, dtype, head_dim, group_size, prompt tokens); the value group is min(group_size, head_dim)
CASES = [
    (8, torch.float32, 16, 4, 13),
    (4, torch.float32, 32, 8, 37),
    (2, torch.float32, 64, 64, 141),  # one value group per head
    (4, torch.bfloat16, 16, 4, 21),
    (2, torch.bfloat16, 32, 8, 29),
    (8, torch.float16, 32, 32, 67),
]


def _pair(nbits, group_size, **kw):
    """A store on the compiled path and one on the eager path, with the same settings."""
    make = dict(nbits=nbits, group_size=group_size, residual_length=2 * group_size, **kw)
    return (QuantizedStore(**make, scratch=DequantScratch(), dequant="compiled"),
            QuantizedStore(**make, scratch=DequantScratch(), dequant="eager"))


def _tokens(g, dtype, heads, head_dim, n=1, batch=2):
    return [torch.randn(batch, heads, n, head_dim, generator=g).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("nbits,dtype,head_dim,group_size,prompt", CASES)
@torch.no_grad()
def test_compiled_steps_equal_the_eager_path(nbits, dtype, head_dim, group_size, prompt):
    """Float32: equal. Bfloat16/float16: keys equal (both round once), values within one rounding of
    ``code * scale`` (the eager path rounds it before adding the zero point, the compiled one does not)."""
    g = torch.Generator().manual_seed(nbits * head_dim + prompt)
    fast, eager = _pair(nbits, group_size)
    first = _tokens(g, dtype, 3, head_dim, prompt)
    fast.append(*first)
    eager.append(*first)
    on_compiled_path = 0
    for _ in range(4 * group_size + 3):  # flushes, and the history capacity doubling
        new = _tokens(g, dtype, 3, head_dim)
        (k1, v1), (k2, v2) = fast.update(*new), eager.update(*new)
        on_compiled_path += fast._views is not None and fast._views[1][17] is not None
        assert k1.shape == k2.shape and v1.shape == v2.shape
        assert torch.equal(k1, k2)
        if dtype == torch.float32:
            assert torch.equal(v1, v2)
        else:
            bound = 2 * torch.finfo(dtype).eps * float(v2.float().abs().max())
            assert float((v1.float() - v2.float()).abs().max()) <= bound
        nq = fast.quantized_length
        assert torch.equal(v1[:, :, nq:], v2[:, :, nq:])  # the residual and the new token: copied exactly
    assert on_compiled_path >= 2 * group_size  # the comparison above really ran the compiled kernel


@torch.no_grad()
def test_one_graph_for_a_whole_generation():
    """The history grows every step and its buffers double: the kernel is compiled once, never again."""
    g = torch.Generator().manual_seed(0)
    fast, eager = _pair(4, 4)
    first = _tokens(g, torch.float32, 5, 16, 11, batch=1)  # 5 heads: a kernel no other test compiles
    fast.append(*first)
    eager.append(*first)
    graphs = []
    for _ in range(60):
        new = _tokens(g, torch.float32, 5, 16, batch=1)
        for a, b in zip(fast.update(*new), eager.update(*new), strict=True):
            assert torch.equal(a, b)
        graphs.append(counters["stats"]["unique_graphs"])
    capacities = fast._codes.shape[3]
    assert capacities >= 64  # doubled at least twice since the first compiled step
    warm = graphs[2 * 4]  # compiled at the first step with two key groups
    assert graphs[2 * 4 :] == [warm] * len(graphs[2 * 4 :]), f"recompiled after warm-up: {graphs}"


@torch.no_grad()
def test_falls_back_to_eager_once_with_the_reason(monkeypatch):
    """No C++ compiler: one RuntimeWarning naming why, the eager result, and later steps on the eager path."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(compiled, "_failed", {})
    g = torch.Generator().manual_seed(1)
    fast, eager = _pair(4, 4)
    first = _tokens(g, torch.float32, 7, 16, 12, batch=1)  # 7 heads: a kernel no other test compiles
    fast.append(*first)
    eager.append(*first)
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/c++"), "fx_graph_cache": False}):
        with pytest.warns(RuntimeWarning, match="compiled dequantization is unavailable"):
            for _ in range(8):  # to two key groups, where the compiled kernel is first called
                new = _tokens(g, torch.float32, 7, 16, batch=1)
                for a, b in zip(fast.update(*new), eager.update(*new), strict=True):
                    assert torch.equal(a, b)
    assert compiled.unavailable(torch.device("cpu")) is not None
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        for _ in range(6):
            new = _tokens(g, torch.float32, 7, 16, batch=1)
            for a, b in zip(fast.update(*new), eager.update(*new), strict=True):
                assert torch.equal(a, b)
    assert not compiled.wanted("compiled", 10_000, 4, torch.device("cpu"))


def test_auto_compiles_only_where_it_pays():
    cpu = torch.device("cpu")
    assert not compiled.wanted("auto", compiled.AUTO_MIN_TOKENS - 64, 64, cpu)
    assert compiled.wanted("auto", compiled.AUTO_MIN_TOKENS, 64, cpu)
    assert not compiled.wanted("eager", 1 << 20, 64, cpu)
    assert compiled.wanted("compiled", 128, 64, cpu) and not compiled.wanted("compiled", 64, 64, cpu)
    assert not compiled.wanted("auto", 1 << 20, 64, torch.device("meta"))  # only CPU is checked so far
    assert "CPU only" in compiled.unavailable(torch.device("meta"))


@pytest.mark.parametrize("bad", ["fast", None, 1, "Compiled"])
def test_dequant_is_validated(bad):
    with pytest.raises(ValueError, match=r"dequant must be one of \['auto', 'compiled', 'eager'\]"):
        QuantizedStore(4, dequant=bad)
    if bad is not None:  # make_cache reads None as "the default", like its other storage keywords
        with pytest.raises(ValueError, match="dequant must be one of"):
            hf_kvplus.make_cache("int4", tiny_model(), dequant=bad)


def test_dequant_reaches_the_stores_of_every_strategy():
    model = tiny_model()
    cache = hf_kvplus.make_cache("int2", model, dequant="eager")
    assert cache.layers[0].store_factory().dequant == "eager"
    cache = hf_kvplus.make_cache("sink", model, budget=64, nbits=4, dequant="compiled")
    assert cache.layers[0].store_factory().dequant == "compiled"


@torch.no_grad()
def test_beam_reorder_and_crop_on_the_compiled_path():
    """Batch reordering and truncation replace the history buffers: later compiled steps read the new ones."""
    g = torch.Generator().manual_seed(3)
    fast, eager = _pair(4, 8)  # the shapes of CASES[1]: the same compiled kernel
    first = _tokens(g, torch.float32, 3, 32, 45)
    fast.append(*first)
    eager.append(*first)
    ran = 0
    for op in (lambda s: s.select_batch(torch.tensor([1, 0])), lambda s: s.truncate(40), lambda s: s.truncate(30)):
        for _ in range(9):
            new = _tokens(g, torch.float32, 3, 32)
            for a, b in zip(fast.update(*new), eager.update(*new), strict=True):
                assert torch.equal(a, b)
            ran += fast._views is not None and fast._views[1][17] is not None
        op(fast), op(eager)
        for a, b in zip(fast.get(), eager.get(), strict=True):
            assert torch.equal(a, b)
    assert ran >= 12  # most steps before the truncations ran the compiled kernel (a partial group runs eagerly)
