"""The compatibility seam (``hf_kvplus._compat``) on the installed transformers, whichever end of the range.

``make test-compat`` runs this file with the oldest and the newest supported transformers; the
pyproject's ``filterwarnings`` turns transformers' deprecation of the cache keyword into an error in
every test, and the test below also checks transformers' one-time logger notice.
"""

from __future__ import annotations

import configparser
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import prompt, tiny_model
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from test_conformance import BUDGET, NAMES, build

import hf_kvplus
from hf_kvplus._compat import (
    CACHE_KEYWORD,
    TESTED_TRANSFORMERS,
    cache_from_call,
    cache_kwargs,
    check_transformers_version,
    layer_dtypes,
    output_cache,
)

ROOT = Path(__file__).resolve().parent.parent
RENAMED = Version(transformers.__version__) >= Version("5.24.0.dev0")
PRESETS = list(hf_kvplus.list_presets())


def test_setup_cfg_declares_the_tested_range():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requires = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    declared = next(line for line in requires if line.startswith("transformers"))
    assert SpecifierSet(declared.removeprefix("transformers")) == SpecifierSet(
        f">={TESTED_TRANSFORMERS[0].removesuffix('.0')},<{TESTED_TRANSFORMERS[1]}"
    )


def _pinned() -> dict:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_constraints_pin_a_transformers_inside_the_range():
    pins = _pinned()
    oldest, first_untested = (Version(v) for v in TESTED_TRANSFORMERS)
    assert oldest <= Version(pins["transformers"]) < first_untested
    assert pins["torch"].startswith("2.13.0")


def test_the_keyword_is_the_one_the_installed_transformers_documents():
    assert CACHE_KEYWORD == ("cache" if RENAMED else "past_key_values")
    model = tiny_model()
    assert cache_kwargs(None) == {CACHE_KEYWORD: None}
    assert list(cache_kwargs(None, model)) == [CACHE_KEYWORD]


def test_a_forward_that_names_only_the_old_keyword_gets_it():
    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return past_key_values

    assert list(cache_kwargs("c", OldStyle())) == ["past_key_values"]


def test_the_cache_is_found_in_a_call_under_either_keyword():
    assert cache_from_call({"cache": 1}) == 1
    assert cache_from_call({"past_key_values": 2}) == 2
    assert cache_from_call({"input_ids": 3}) is None


@torch.no_grad()
def test_output_cache_and_layer_dtypes_read_the_installed_fields():
    model = tiny_model()
    cache = transformers.DynamicCache(config=model.config)
    out = model(prompt(length=5), **cache_kwargs(cache, model), use_cache=True)
    assert output_cache(out) is cache
    assert layer_dtypes(cache.layers[0]) == (torch.float32, torch.float32)


def test_out_of_range_versions_warn_naming_both_versions():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_transformers_version(TESTED_TRANSFORMERS[0])
        assert check_transformers_version(_pinned()["transformers"])  # the newest version tested
    assert not caught
    for outside in ("5.19.0", TESTED_TRANSFORMERS[1] + ".0", "6.0.0"):
        with pytest.warns(UserWarning, match=rf"transformers {outside}.*>={TESTED_TRANSFORMERS[0]},<{TESTED_TRANSFORMERS[1]}"):
            assert not check_transformers_version(outside)


def test_import_warns_once_outside_the_range_and_not_inside():
    code = (
        "import warnings, transformers\n"
        "transformers.__version__ = {version!r}\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import hf_kvplus, importlib\n"
        "    import hf_kvplus.eval\n"
        "print(sum('hf_kvplus was tested with transformers' in str(x.message) for x in w))\n"
    )
    counts = {}
    for version in ("6.1.0", transformers.__version__):
        done = subprocess.run([sys.executable, "-c", code.format(version=version)], capture_output=True, text=True,
                              cwd=ROOT, check=True)
        counts[version] = int(done.stdout.strip().splitlines()[-1])
    assert counts == {"6.1.0": 1, transformers.__version__: 0}


class _Notices(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@torch.no_grad()
def test_no_deprecation_warning_comes_from_hf_kvplus_calls():
    """prefill, both eval protocols, a prefix store and generate through our caches, all warnings recorded."""
    from hf_kvplus.eval import compression_perplexity, streaming_perplexity

    model = tiny_model()
    ids = prompt(length=40, seed=1)
    handler = _Notices()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = hf_kvplus.make_cache("h2o", model, budget=16)
            hf_kvplus.prefill(model, ids, cache, chunk_size=8)
            streaming_perplexity(model, hf_kvplus.make_cache("sink", model, budget=16), ids[0], chunk_size=4)
            compression_perplexity(model, lambda: hf_kvplus.make_cache("sink", model, budget=16), ids[0],
                                   context_length=24, target_length=8, windows=1)
            store = hf_kvplus.PrefixStore(block_size=8)
            for _ in range(2):
                request = store.cache_for(model, ids[:, :32])
                model.generate(ids[:, :32], max_new_tokens=2, do_sample=False, **cache_kwargs(request))
    finally:
        logger.removeHandler(handler)
    noisy = [str(w.message) for w in caught if "past_key_values" in str(w.message) or "`cache`" in str(w.message)]
    noisy += [m for m in handler.messages if "past_key_values" in m or "deprecated" in m]
    assert not noisy


@pytest.mark.parametrize("name", NAMES + PRESETS)
@torch.no_grad()
def test_both_keywords_give_the_same_tokens(name):
    """On 5.24+ ``past_key_values=`` is a deprecated alias of ``cache=``; before 5.24 ``cache=`` is refused."""
    model = tiny_model()
    ids = prompt(batch=2, length=20, seed=4)
    budget = BUDGET if hf_kvplus.get_spec(name).evicting else None
    new = dict(max_new_tokens=12, do_sample=False)
    if not RENAMED:
        with pytest.raises(ValueError, match="cache"):
            model.generate(ids, cache=build(name, model, budget), **new)
        return
    with_cache = model.generate(ids, cache=build(name, model, budget), **new)
    with pytest.warns(FutureWarning, match="past_key_values"):
        with_old = model.generate(ids, past_key_values=build(name, model, budget), **new)
    assert torch.equal(with_cache, with_old)


@torch.no_grad()
def test_evicting_layers_are_croppable_only_while_eviction_is_deferred():
    """5.24's assisted decoding asks ``cache.is_croppable`` (all layers) after its first forward."""
    model = hf_kvplus.attach(tiny_model(), attention_scores=True)  # a sink cache verifies drafts in "kvplus" attention
    cache = hf_kvplus.make_cache("sink", model, budget=8)
    model(prompt(length=20), **cache_kwargs(cache, model), use_cache=True)  # evicted: a crop cannot restore
    assert not cache.is_croppable and not any(layer.is_croppable for layer in cache.layers)
    cache.activate_past_recording()
    assert cache.is_croppable
    model(prompt(length=3, seed=2), **cache_kwargs(cache, model), use_cache=True)
    cache.crop(-3)  # what assisted decoding does with rejected drafts
    assert cache.get_seq_length() == 20
    dense = hf_kvplus.make_cache("dynamic", model)
    assert all(getattr(layer, "is_croppable", True) for layer in dense.layers)


@torch.no_grad()
def test_a_second_prefix_request_reuses_the_shared_blocks():
    model = tiny_model()
    store = hf_kvplus.PrefixStore(block_size=8)
    shared = prompt(length=40, seed=6)
    first = torch.cat([shared, prompt(length=5, seed=7)], dim=1)
    model.generate(first, max_new_tokens=2, do_sample=False, **cache_kwargs(store.cache_for(model, first)))
    second = torch.cat([shared, prompt(length=6, seed=8)], dim=1)
    cache = store.cache_for(model, second)
    assert cache.get_seq_length() == 40
    out = model.generate(second, max_new_tokens=6, do_sample=False, **cache_kwargs(cache))
    dense = model.generate(second, max_new_tokens=6, do_sample=False,
                           **cache_kwargs(transformers.DynamicCache(config=model.config)))
    assert torch.equal(out, dense)


def _preset(name: str, model):
    """Each preset on settings where its mechanism acts within a short test: eviction, or packed history."""
    if hf_kvplus.get_spec(name).evicting:
        return hf_kvplus.make_cache(name, model, budget=BUDGET)
    return hf_kvplus.make_cache(name, model, group_size=4, residual_length=4)


@pytest.mark.parametrize("name", PRESETS)
@torch.no_grad()
def test_presets_left_padded_rows_generate_as_alone(name):
    model = tiny_model()
    ids = prompt(batch=2, length=18, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, **cache_kwargs(_preset(name, model)))
    for row, start in ((0, 0), (1, 7)):
        alone = model.generate(ids[row : row + 1, start:], max_new_tokens=16, do_sample=False,
                               **cache_kwargs(_preset(name, model)))
        assert torch.equal(batch[row, 18:], alone[0, 18 - start :]), f"row {row} differs when padded"


@pytest.mark.parametrize("name", PRESETS)
@torch.no_grad()
def test_presets_run_prompt_lookup_decoding(name):
    model = hf_kvplus.attach(tiny_model(), attention_scores=True)  # drafts are verified in the "kvplus" attention
    ids = prompt(length=20, seed=2).repeat(1, 2)
    cache = _preset(name, model)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3, **cache_kwargs(cache))
    assert out.shape == (1, 52)
    if hf_kvplus.get_spec(name).evicting:
        assert max(layer.kept for layer in cache.layers) <= BUDGET + 12
