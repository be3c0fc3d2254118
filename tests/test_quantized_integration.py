"""The quantized cache on the embedded SmolLM2-135M model (select with ``-m integration``)."""

from __future__ import annotations

import pytest
import torch

import hf_kvplus
from hf_kvplus.eval import compression_perplexity

pytestmark = pytest.mark.integration


@torch.no_grad()
def test_int4_keeps_dense_perplexity_in_a_fifth_of_the_memory(default_model):
    model, _, ids = default_model
    # The protocol: mean of 3 windows (benchmarks/quantized.py measures +0.14%). A single window
    # is noisier: the first one alone is +1.1% (9.10 against 9.01).
    dense = compression_perplexity(model, lambda: hf_kvplus.make_cache("dynamic", model), ids, windows=3)
    int4 = compression_perplexity(model, lambda: hf_kvplus.make_cache("int4", model), ids, windows=3)
    assert int4["ppl"] < 1.01 * dense["ppl"]
    # 1920 tokens at 4.5 bits and 128 fp32 residual tokens, against 2048 fp32 tokens: 0.2 of the bytes, plus
    # the scratch the decoding steps restore the history into (one layer's keys and values in the model dtype
    # and their codes, shared by the 30 layers, sized by doubling; counted by cache_nbytes): 0.23-0.24.
    assert int4["cache_bytes"] < 0.25 * dense["cache_bytes"]
