"""Bad input, one table: every public constructor and function refuses it with a ``ValueError`` or
``TypeError`` whose message names the bad value and what is allowed.

Each row is ``(call, error type, regex the message must match)``; the regex always contains the bad
value and the allowed values or range. Mismatched dtype or device between a cache and the model
that feeds it is refused at the first ``update`` that mixes them, naming both.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model
from transformers import PreTrainedConfig

import hf_kvplus
from hf_kvplus import (
    HeavyHitterCache,
    KeyNormCache,
    PrefixSharedCache,
    PrefixStore,
    QuantizedKVCache,
    QuantizedStore,
    SinkCache,
    SnapKVCache,
    TovaCache,
    make_cache,
)
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.eval import compression_perplexity, decode_speed, parse_recipe, streaming_perplexity

MODEL = tiny_model("llama-gqa")
CONFIG = MODEL.config
IDS = prompt(length=24)


class NoHeadsConfig(PreTrainedConfig):
    model_type = "no-heads"


def recipe(**experiment):
    return lambda: parse_recipe({"experiments": [experiment]})


def sink(**kwargs):
    return lambda: SinkCache(CONFIG, **kwargs)


ALLOWED_NAMES = r"choose one of \[.*'sink'.*'int4'.*'window'\]"
CASES = {
    # -- make_cache and the registry
    "unknown strategy": (lambda: make_cache("sinq", MODEL, budget=8), ValueError, r"unknown cache 'sinq'; " + ALLOWED_NAMES),
    "strategy not a string": (lambda: make_cache(3, MODEL), TypeError, "cache name must be a string, got int"),
    "unknown keyword": (lambda: make_cache("sink", MODEL, budget=8, bugdet=3), TypeError,
                        r"unexpected keyword argument\(s\) \['bugdet'\]; it accepts \['budget', 'window_length'"),
    "unknown keyword of a scorer": (lambda: make_cache("keynorm", MODEL, budget=8, window=3), TypeError,
                                    r"\['window'\]; it accepts \['budget', 'heavy_ratio'"),
    "not a model": (lambda: make_cache("sink", "gpt2", budget=8), TypeError,
                    "needs a transformers model or PreTrainedConfig, got str"),
    "missing budget": (lambda: make_cache("h2o", MODEL), ValueError, r"'h2o' evicts tokens: pass budget=.*integer >= 1"),
    "config without attention heads": (lambda: make_cache("dynamic", NoHeadsConfig()), ValueError,
                                       "num_hidden_layers=None: .*integer num_hidden_layers >= 1"),
    "config None": (lambda: SinkCache(None, budget=8), TypeError, "PreTrainedConfig, got NoneType"),
    "register a non-spec": (lambda: hf_kvplus.register_cache("sink2"), TypeError, "expects a hf_kvplus.CacheSpec, got str"),
    "register a taken name": (lambda: hf_kvplus.register_cache(hf_kvplus.get_spec("sink")), ValueError,
                              "'sink' is already registered"),
    "preset of an unknown strategy": (lambda: hf_kvplus.register_preset("p", "nope"), ValueError,
                                      r"unknown strategy 'nope' .*registered: \[.*'sink'"),
    # -- sink
    "budget smaller than sinks": (sink(budget=3, num_sink_tokens=4), ValueError,
                                  r"budget \(3\) must be larger than num_sink_tokens \(4\)"),
    "budget equal to sinks": (sink(budget=4), ValueError, r"budget \(4\) must be larger than num_sink_tokens \(4\)"),
    "negative budget": (sink(budget=-3), ValueError, "budget must be an integer >= 1, got -3"),
    "fractional budget": (sink(budget=2.5), ValueError, "budget must be an integer >= 1, got 2.5"),
    "negative sinks": (sink(budget=8, num_sink_tokens=-1), ValueError, "num_sink_tokens must be an integer >= 0, got -1"),
    "budget and window": (sink(budget=8, window_length=4), ValueError,
                          "exactly one of budget or window_length, got budget=8, window_length=4"),
    "zero window": (sink(window_length=0), ValueError, "window_length must be an integer >= 1, got 0"),
    "rerotate not a bool": (sink(budget=8, rerotate_keys="yes"), ValueError, "rerotate_keys must be True or False, got 'yes'"),
    # -- storage keywords (every strategy)
    "nbits=3": (lambda: make_cache("sink", MODEL, budget=8, nbits=3), ValueError, r"nbits must be one of \{8, 4, 2\}, got 3"),
    "nbits as text": (lambda: QuantizedKVCache(CONFIG, nbits="4"), ValueError, r"one of \{8, 4, 2\}, got '4'"),
    "nbits True": (lambda: QuantizedKVCache(CONFIG, nbits=True), ValueError, r"one of \{8, 4, 2\}, got True"),
    "negative group": (lambda: QuantizedKVCache(CONFIG, group_size=-4), ValueError, "group_size must be an integer >= 1, got -4"),
    "negative residual": (lambda: QuantizedKVCache(CONFIG, residual_length=-1), ValueError,
                          "residual_length must be an integer >= 0, got -1"),
    "residual not a multiple": (lambda: QuantizedStore(group_size=32, residual_length=40), ValueError,
                                r"residual_length \(40\) must be a multiple of group_size \(32\)"),
    "scale dtype": (lambda: QuantizedKVCache(CONFIG, scale_dtype=torch.int8), ValueError,
                    "scale_dtype must be one of torch.float16, torch.bfloat16, torch.float32, got torch.int8"),
    "backend": (lambda: QuantizedKVCache(CONFIG, backend="cuda"), ValueError,
                r"backend must be one of \['torch', 'quanto'\], got 'cuda'"),
    "group without nbits": (lambda: make_cache("h2o", MODEL, budget=8, group_size=32), ValueError,
                            r"\['group_size'\] only apply to quantized storage: also pass nbits \(one of \{8, 4, 2\}\)"),
    "factory and nbits": (lambda: make_cache("sink", MODEL, budget=8, store_factory=hf_kvplus.DenseStore, nbits=4),
                          ValueError, r"either store_factory or storage keywords, not both \(got \['nbits'\]\)"),
    "factory not callable": (lambda: make_cache("sink", MODEL, budget=8, store_factory=3), TypeError,
                             r"store_factory must be callable \(returning a KVStore\), got int"),
    "group not dividing head_dim": (
        lambda: MODEL(IDS, **cache_kwargs(make_cache("int4", MODEL, group_size=12, residual_length=0)), use_cache=True),
        ValueError, r"head_dim \(16\) must be a multiple of group_size \(12\)"),
    # -- score-based
    "h2o negative budget": (lambda: HeavyHitterCache(CONFIG, budget=-1), ValueError, "budget must be an integer >= 1, got -1"),
    "heavy ratio above 1": (lambda: HeavyHitterCache(CONFIG, budget=8, heavy_ratio=2), ValueError,
                            r"heavy_ratio must be a number in \[0, 1\], got 2"),
    "sinks and window beyond budget": (lambda: HeavyHitterCache(CONFIG, budget=8, num_sink_tokens=9), ValueError,
                                       r"num_sink_tokens \(9\) \+ recent_window \(1\) must not exceed the budget \(8\)"),
    "negative recent window": (lambda: KeyNormCache(CONFIG, budget=8, recent_window=-1), ValueError,
                               "recent_window must be an integer >= 0, got -1"),
    "normalize not a bool": (lambda: HeavyHitterCache(CONFIG, budget=8, normalize="yes"), ValueError,
                             "normalize must be True or False, got 'yes'"),
    "per_head not a bool": (lambda: TovaCache(CONFIG, budget=8, per_head="no"), ValueError,
                            "per_head must be True or False, got 'no'"),
    "tova zero budget": (lambda: TovaCache(CONFIG, budget=0), ValueError, "budget must be an integer >= 1, got 0"),
    "even pooling kernel": (lambda: SnapKVCache(CONFIG, budget=8, kernel_size=4), ValueError, "kernel_size must be odd.*got 4"),
    "zero observation window": (lambda: SnapKVCache(CONFIG, budget=8, window=0), ValueError,
                                "window must be an integer >= 1, got 0"),
    # -- prefix sharing
    "store max_bytes": (lambda: PrefixStore(max_bytes=-1), ValueError, "max_bytes must be an integer >= 1 or None, got -1"),
    "store block size": (lambda: PrefixStore(block_size=0), ValueError, "block_size must be an integer >= 1, got 0"),
    "store nbits=3": (lambda: PrefixStore(nbits=3), ValueError, r"nbits must be one of \{8, 4, 2\}, got 3"),
    "store group size": (lambda: PrefixStore(nbits=4, block_size=16, group_size=12), ValueError,
                         "group_size must be a positive divisor of block_size=16, got 12"),
    "store policy": (lambda: PrefixStore(policy=object()), TypeError, r"policy must have a choose\(candidates\) method, got object"),
    "prefix cache store": (lambda: PrefixSharedCache(CONFIG, store="x"), TypeError,
                           "store must be a hf_kvplus.PrefixStore or None, got str"),
    "prefix cache budget": (lambda: PrefixSharedCache(CONFIG, budget=5), TypeError,
                            r"unexpected keyword argument\(s\) \['budget'\]; it accepts \['store', 'store_factory'"),
    "float token ids": (lambda: PrefixStore().cache_for(MODEL, torch.rand(1, 8)), ValueError,
                        r"integer token ids of shape \[batch, length >= 1\], got \(1, 8\) torch.float32"),
    "cache_for mask shape": (lambda: PrefixStore().cache_for(MODEL, IDS, attention_mask=torch.ones(1, 3)), ValueError,
                             r"attention_mask has shape \(1, 3\), input_ids \(1, 24\)"),
    "missing store file": (lambda: PrefixStore.load("/nonexistent/store.safetensors", MODEL), FileNotFoundError,
                           "no PrefixStore file at /nonexistent/store.safetensors"),
    # -- cache operations
    "crop a positive count": (lambda: make_cache("sink", MODEL, budget=8).crop(3), ValueError,
                              r"crop\(3\): .*only accept a negative count"),
    "crop a float": (lambda: make_cache("h2o", MODEL, budget=8).crop(-1.5), ValueError, r"crop\(-1.5\): .*negative count"),
    # -- functions
    "prefill chunk size": (lambda: hf_kvplus.prefill(MODEL, IDS, make_cache("sink", MODEL, budget=8), chunk_size=0),
                           ValueError, "chunk_size must be an integer >= 1, got 0"),
    "prefill 1-D ids": (lambda: hf_kvplus.prefill(MODEL, IDS[0], make_cache("sink", MODEL, budget=8)), ValueError,
                        r"non-empty \[batch, length\] tensor, got \(24,\)"),
    "prefill mask shape": (lambda: hf_kvplus.prefill(MODEL, IDS, make_cache("sink", MODEL, budget=8),
                                                     attention_mask=torch.ones(1, 3)),
                           ValueError, r"shape of input_ids \(1, 24\), got \(1, 3\)"),
    "attach a string": (lambda: hf_kvplus.attach("model"), TypeError, r"expects a transformers model \(torch.nn.Module\), got str"),
    "cache_nbytes of a string": (lambda: hf_kvplus.cache_nbytes("cache"), TypeError,
                                 r"counts caches \(transformers.Cache\), cache layers, .* got str"),
    "cache_nbytes of a model": (lambda: hf_kvplus.cache_nbytes(MODEL), TypeError, "got LlamaForCausalLM"),
    "streaming chunk size": (lambda: streaming_perplexity(MODEL, make_cache("sink", MODEL, budget=8), IDS, chunk_size=0),
                             ValueError, "chunk_size must be a positive integer, got 0"),
    "streaming beyond the text": (lambda: streaming_perplexity(MODEL, make_cache("sink", MODEL, budget=8), IDS,
                                                               num_tokens=1000),
                                  ValueError, r"num_tokens must be between 2 and 24 \(the text length\), got 1000"),
    "streaming a batch": (lambda: streaming_perplexity(MODEL, make_cache("sink", MODEL, budget=8), prompt(batch=2)),
                          ValueError, r"one sequence of token ids, got a batch of shape \(2, 24\)"),
    "compression windows": (lambda: compression_perplexity(MODEL, lambda: make_cache("dynamic", MODEL), IDS,
                                                           context_length=8, target_length=4, windows=0),
                            ValueError, "windows must be a positive integer, got 0"),
    "decode zero tokens": (lambda: decode_speed(MODEL, make_cache("dynamic", MODEL), IDS, new_tokens=0), ValueError,
                           "new_tokens must be an integer >= 1, got 0"),
    # -- recipes (checked while parsing, before any model loads)
    "recipe strategy": (recipe(grid=[{"strategy": "sinq", "budget": 8}]), ValueError,
                        r"strategy 'sinq': unknown cache 'sinq'; " + ALLOWED_NAMES),
    "recipe nbits=3": (recipe(grid=[{"strategy": "quantized", "nbits": [8, 3]}]), ValueError,
                       r"strategy 'quantized': nbits must be one of \{8, 4, 2\}, got 3"),
    "recipe sinks beyond budget": (recipe(grid=[{"strategy": "sink", "budget": 16, "num_sink_tokens": 20}]), ValueError,
                                   r"budget \(16\) must be larger than num_sink_tokens \(20\)"),
    "recipe unknown keyword": (recipe(grid=[{"strategy": "sink", "budget": 16, "windw": 3}]), ValueError,
                               r"\['windw'\]; it accepts \['budget'"),
    "recipe negative budget": (recipe(budgets=[-4]), ValueError, r"bad value -4 in experiments\[0\].budgets: .*integers > 0"),
    "recipe keep ratio": (recipe(keep_ratios=[2]), ValueError, r"bad value 2 .*keep_ratios: .*numbers > 0 and <= 1"),
    "recipe protocol": (recipe(protocol="perplexity"), ValueError,
                        r"unknown protocol 'perplexity' .*choose one of \['compression', 'cost_of_caching', 'passkey', 'prompt_order', 'streaming'\]"),
    "recipe context length": (recipe(protocol={"name": "compression", "context_length": -5}), ValueError,
                              "bad value -5 for .*context_length: allowed values are integers >= 1"),
    "recipe dtype": (lambda: parse_recipe({"model": {"dtype": "float8"}, "experiments": [{}]}), ValueError,
                     r"unknown dtype 'float8'; choose one of \[.*'float32'"),
    "recipe field": (lambda: parse_recipe({"experiments": [{}], "modle": "x"}), ValueError,
                     r"unknown field\(s\) \['modle'\] in recipe; allowed: \['name'"),
    "recipe threads": (lambda: parse_recipe({"model": {"threads": 0}, "experiments": [{}]}), ValueError,
                       "bad value 0 for model.threads: allowed values are integers >= 1"),
}


@pytest.mark.parametrize(("call", "error", "message"), list(CASES.values()), ids=list(CASES))
def test_bad_input_is_refused_with_a_message_naming_it(call, error, message):
    with pytest.raises(error, match=message) as raised:
        call()
    assert type(raised.value) is error  # not a subclass raised by accident deeper down (e.g. an AttributeError)


# ------------------------------------------------------------------ dtype and device
KV_CACHES = {
    "sink": dict(budget=8),
    "h2o": dict(budget=8),
    "tova": dict(budget=8),
    "keynorm": dict(budget=8),
    "snapkv": dict(budget=8, window=4),  # the default window (32) would leave nothing to score: refused
    "expected": dict(budget=8),
    "quantized": dict(nbits=4, group_size=4, residual_length=4),
    "prefix": {},
}


def test_the_dtype_table_covers_every_registered_cache():
    assert set(KV_CACHES) | {"dynamic"} == set(hf_kvplus.list_caches())


@pytest.mark.parametrize("name", list(KV_CACHES))
@torch.no_grad()
def test_a_model_of_another_dtype_is_refused_naming_both(name):
    cache = make_cache(name, MODEL, **KV_CACHES[name])
    MODEL(prompt(length=12), **cache_kwargs(cache), use_cache=True)
    half = tiny_model("llama-gqa").to(torch.bfloat16)
    hf_kvplus.attach(half, attention_scores=hf_kvplus.get_spec(name).attention_scores)
    with pytest.raises(ValueError, match=r"holds torch.float32 on cpu but received torch.bfloat16 on cpu"):
        half(prompt(length=2), **cache_kwargs(cache), use_cache=True)


@pytest.mark.parametrize("name", list(KV_CACHES))
@torch.no_grad()
def test_keys_on_another_device_are_refused_naming_both(name):
    cache = make_cache(name, MODEL, **KV_CACHES[name])
    MODEL(prompt(length=12), **cache_kwargs(cache), use_cache=True)
    keys = torch.empty(1, 2, 1, 16, device="meta")  # any device other than the one the cache was filled on
    with pytest.raises(ValueError, match=r"holds torch.float32 on cpu but received torch.float32 on meta"):
        cache.update(keys, keys, 0)


def test_an_empty_cache_takes_the_dtype_of_the_first_model_that_fills_it():
    cache = make_cache("sink", MODEL, budget=8)  # built from a float32 model
    half = hf_kvplus.attach(tiny_model("llama-gqa").to(torch.bfloat16))
    with torch.no_grad():
        half(prompt(length=12), **cache_kwargs(cache), use_cache=True)
    assert cache.layers[0].keys.dtype == torch.bfloat16


def test_a_prefix_store_refuses_a_model_of_another_dtype():
    store = PrefixStore(block_size=4)
    with torch.no_grad():
        MODEL.generate(IDS, max_new_tokens=2, **cache_kwargs(store.cache_for(MODEL, IDS)))
    half = tiny_model("llama-gqa").to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"another model \(dtype: 'float32' vs 'bfloat16'"):
        store.cache_for(half, IDS)
