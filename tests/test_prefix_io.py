"""PrefixStore.save / PrefixStore.load: safetensors round trip and a clear error for every bad file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prompt, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import hf_kvplus
from hf_kvplus import PrefixStore
from hf_kvplus._compat import cache_kwargs
from hf_kvplus.prefix.io import _checksum


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A store holding two requests that share a prefix, saved to a file: ``(model, store, path, requests)``."""
    model = tiny_model("llama-gqa")
    store = PrefixStore(block_size=4, max_bytes=2**20)
    prefix = prompt(length=16, seed=1)
    reqs = [torch.cat([prefix, prompt(length=9, seed=s)], dim=1) for s in (2, 3)]
    with torch.no_grad():
        for ids in reqs:
            model.generate(ids, max_new_tokens=4, do_sample=False, **cache_kwargs(store.cache_for(model, ids)))
    path = tmp_path_factory.mktemp("prefix") / "store.safetensors"
    store.save(path)
    return model, store, path, reqs


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}


def test_round_trip_restores_every_prefix_and_the_same_outputs(saved):
    model, store, path, reqs = saved
    loaded = PrefixStore.load(path, model)
    before, after = store.stats(), loaded.stats()
    assert (after["tokens_held"], after["nodes"], after["max_bytes"]) == (before["tokens_held"], before["nodes"], 2**20)
    assert after["bytes_held"] == hf_kvplus.cache_nbytes(loaded)
    for ids in reqs:
        old, new = store.match(ids), loaded.match(ids)
        assert old.length == new.length == 24
        for layer in range(model.config.num_hidden_layers):
            held = [torch.cat([p[layer].get()[0][:, :, a:b] for p, a, b in m.segments], dim=2) for m in (old, new)]
            assert torch.equal(*held)
        with torch.no_grad():
            cache = loaded.cache_for(model, ids)
            assert cache.shared_length == 24
            out = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(cache))
            assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False))


def test_nothing_is_pickled():
    from pathlib import Path

    sources = Path(hf_kvplus.__file__).parent.rglob("*.py")
    assert not [p.name for p in sources if any(word in p.read_text() for word in ("import pickle", "torch.load("))]


def test_a_file_from_another_model_is_refused(saved, tmp_path):
    _, _, path, _ = saved
    with pytest.raises(ValueError, match="another model.*(model_type|num_layers)"):
        PrefixStore.load(path, tiny_model("qwen2-mqa"))
    other = tiny_model("llama-gqa")
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.add_(1e-3)  # same config, different weights
    with pytest.raises(ValueError, match="first_layer_sha256"):
        PrefixStore.load(path, other)
    config = tiny_model("llama-gqa").config
    assert PrefixStore.load(path, config).stats()["nodes"] > 0  # a config cannot check weights ...
    with pytest.raises(ValueError, match="first_layer_sha256"):
        PrefixStore.load(path, config).cache_for(other, prompt(length=8))  # ... the first model used does


def rewrite(path, target, change):
    metadata, tensors = read(path)
    change(metadata, tensors)
    save_file(tensors, str(target), metadata=metadata)
    return target


def resign(metadata, tensors):
    metadata["checksum"] = _checksum(tensors, metadata)


BAD_FILES = [
    ("truncated", lambda data: data[: len(data) - 100], "not a readable safetensors file"),
    ("garbage", lambda data: b"\x00" * 64, "not a readable safetensors file"),
    ("flipped byte", lambda data: data[:-10] + bytes([data[-10] ^ 1]) + data[-9:], "fails its checksum"),
]


@pytest.mark.parametrize(("name", "damage", "message"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_a_damaged_file_gets_a_clear_error(saved, tmp_path, name, damage, message):
    model, _, path, _ = saved
    target = tmp_path / "bad.safetensors"
    target.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        PrefixStore.load(target, model)


EDITED = [
    ("version", lambda m, t: m.update(version="2"), "format version '2'"),
    ("not a store", lambda m, t: m.pop("format"), "not a hf_kvplus PrefixStore file"),
    ("edited fingerprint", lambda m, t: m.update(fingerprint=m["fingerprint"].replace("llama", "mistral")), "checksum"),
    ("edited tokens", lambda m, t: t["tokens"].add_(1), "checksum"),
    ("re-signed, wrong shape", lambda m, t: (t.update({"node0.keys": t["node0.keys"][:, :1].contiguous()}), resign(m, t)), "shape"),
    ("re-signed, bad parent", lambda m, t: (t["nodes"].__setitem__((0, 0), 5), resign(m, t)), "parent 5"),
    ("re-signed, lost tokens", lambda m, t: (t.update(tokens=torch.cat([t["tokens"], t["tokens"][:4]])), resign(m, t)),
     "belong to no node"),
    ("re-signed, dtype", lambda m, t: (t.update({"node0.keys": t["node0.keys"].double()}), resign(m, t)), "float64"),
]


@pytest.mark.parametrize(("name", "edit", "message"), EDITED, ids=[case[0] for case in EDITED])
def test_an_edited_file_gets_a_clear_error(saved, tmp_path, name, edit, message):
    model, _, path, _ = saved
    target = rewrite(path, tmp_path / "edited.safetensors", edit)
    with pytest.raises(ValueError, match=message):
        PrefixStore.load(target, model)


def test_other_errors_are_named(saved, tmp_path):
    model, _, path, _ = saved
    with pytest.raises(FileNotFoundError, match="no PrefixStore file"):
        PrefixStore.load(tmp_path / "missing.safetensors", model)
    with pytest.raises(ValueError, match="larger max_bytes"):
        PrefixStore.load(path, model, max_bytes=1000)
    with pytest.raises(ValueError, match="bound to no model"):
        PrefixStore().save(tmp_path / "unbound.safetensors")
    metadata, _ = read(path)
    assert json.loads(metadata["fingerprint"])["num_layers"] == 2 and metadata["version"] == "1"


class _Trap:
    """Unpickling this creates ``marker``: proof that a loader unpickled the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_file_is_refused_without_being_unpickled(saved, tmp_path, writer):
    import pickle

    model = saved[0]
    marker, target = tmp_path / "unpickled", tmp_path / "store.bin"
    payload = {"node0.keys": _Trap(str(marker))}
    if writer == "pickle":
        target.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, target)
    pickle.loads(pickle.dumps(_Trap(str(tmp_path / "trap-works"))))  # the trap does fire when unpickled ...
    assert (tmp_path / "trap-works").exists()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PrefixStore.load(target, model)
    assert not marker.exists()  # ... and loading never unpickled the file
