"""The disk cache for converted models (hf_kvplus/eval/disk_cache.py), on a tiny random model and a dummy
source file standing in for the GGUF: convert once, load after with the same logits, rebuild what is
broken, never expose a half-written entry."""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import prompt, tiny_model
from transformers import LlamaForCausalLM

from hf_kvplus.eval import disk_cache
from hf_kvplus.eval.disk_cache import (
    MANIFEST,
    PlainWeights,
    cache_enabled,
    cache_root,
    entry_path,
    entry_valid,
    load_or_convert,
    write_entry,
)


class Source:
    """A dummy source file plus a converter that counts its calls and returns a fixed tiny model."""

    def __init__(self, folder):
        self.path = folder / "model.gguf"
        self.path.write_bytes(os.urandom(3 << 20))
        self.model = tiny_model("llama-gqa")
        self.calls = 0

    def convert(self):
        self.calls += 1
        return (self.model,)


def load(entry):
    return LlamaForCausalLM.from_pretrained(entry, dtype=torch.float32)


def logits(model):
    with torch.no_grad():
        return model(prompt()).logits  # [1, 24, vocab]


def test_converts_once_then_loads_the_entry_with_identical_logits(tmp_path):
    source, root = Source(tmp_path), tmp_path / "cache"
    first = load_or_convert(source.path, source.convert, load, root=root)
    second = load_or_convert(source.path, source.convert, load, root=root)
    entry = entry_path(source.path, root)
    assert source.calls == 1 and first is source.model
    assert second.name_or_path == str(entry) and entry_valid(entry)
    assert logits(second).dtype == torch.float32 and torch.equal(logits(first), logits(second))
    assert (entry / "model.safetensors").is_file()
    assert [p.name for p in root.iterdir()] == [entry.name]  # no temporary folder left behind


def test_reload_returns_the_loaded_copy(tmp_path):
    source = Source(tmp_path)
    model = load_or_convert(source.path, source.convert, load, root=tmp_path / "c", reload=True)
    assert model is not source.model and model.name_or_path == str(entry_path(source.path, tmp_path / "c"))


def test_key_follows_the_content_not_the_name_or_the_time(tmp_path):
    source = Source(tmp_path)
    key = entry_path(source.path, tmp_path).name
    os.utime(source.path, (0, 0))
    assert entry_path(source.path, tmp_path).name == key
    data = bytearray(source.path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle, same size
    source.path.write_bytes(bytes(data))
    assert entry_path(source.path, tmp_path).name != key and key.startswith("model-")


@pytest.mark.parametrize("damage", ["no manifest", "truncated", "missing file", "bad manifest"])
def test_a_partial_entry_is_detected_and_rebuilt(tmp_path, damage):
    source, root = Source(tmp_path), tmp_path / "cache"
    load_or_convert(source.path, source.convert, load, root=root)
    entry = entry_path(source.path, root)
    weights = entry / "model.safetensors"
    if damage == "no manifest":
        (entry / MANIFEST).unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "missing file":
        (entry / "config.json").unlink()
    else:
        (entry / MANIFEST).write_text("{not json")
    assert not entry_valid(entry)
    model = load_or_convert(source.path, source.convert, load, root=root)
    assert source.calls == 2 and model is source.model and entry_valid(entry)
    assert torch.equal(logits(load(entry)), logits(source.model))


def test_a_damaged_file_of_the_right_size_is_rebuilt_when_it_fails_to_load(tmp_path):
    source, root = Source(tmp_path), tmp_path / "cache"
    load_or_convert(source.path, source.convert, load, root=root)
    weights = entry_path(source.path, root) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8  # the safetensors header length: now far past the end of the file
    weights.write_bytes(bytes(data))
    assert entry_valid(weights.parent)  # sizes match: only loading finds it
    model = load_or_convert(source.path, source.convert, load, root=root)
    assert source.calls == 2 and model is source.model
    assert torch.equal(logits(load(weights.parent)), logits(source.model))


def test_another_process_finishing_first_wins_and_ours_is_discarded(tmp_path):
    source, root = Source(tmp_path), tmp_path / "cache"
    entry = entry_path(source.path, root)
    other = tiny_model("llama-gqa")
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)  # tell the two copies apart

    class Racer:
        def save_pretrained(self, folder):  # while we write, the other process renames its copy into place
            write_entry(entry, [other])
            source.model.save_pretrained(folder)

    write_entry(entry, [Racer()])
    assert entry_valid(entry) and torch.equal(logits(load(entry)), logits(other))
    assert [p.name for p in root.iterdir()] == [entry.name]


def test_stale_temporary_folders_are_removed_fresh_ones_kept(tmp_path):
    source, root = Source(tmp_path), tmp_path / "cache"
    stale, fresh = root / ".tmp-x-old", root / ".tmp-x-new"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    write_entry(entry_path(source.path, root), source.convert())
    assert not stale.exists() and fresh.exists()


def test_cache_root_and_switch_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(disk_cache.ENV_DIR, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv(disk_cache.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hf_kvplus"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "hf_kvplus"
    monkeypatch.delenv(disk_cache.ENV_SWITCH, raising=False)
    assert cache_enabled() and not cache_enabled(False) and cache_enabled(True)
    monkeypatch.setenv(disk_cache.ENV_SWITCH, "off")
    assert not cache_enabled() and cache_enabled(True)
    monkeypatch.setenv(disk_cache.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="HF_KVPLUS_DISK_CACHE='maybe'"):
        cache_enabled()


@pytest.mark.integration
def test_embedded_model_second_load_reads_the_entry_with_identical_logits(monkeypatch, tmp_path, capsys):
    from hf_kvplus.eval.models import (
        default_model_file,
        load_default_model,
        load_default_text,
        load_default_tokenizer,
    )

    monkeypatch.setenv(disk_cache.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(disk_cache.ENV_SWITCH, raising=False)
    entry = entry_path(default_model_file())
    converted = load_default_model()  # no entry yet: converts the GGUF file and writes the entry
    assert "converting the embedded GGUF model once" in capsys.readouterr().err
    assert entry.parent == tmp_path and entry_valid(entry) and converted.name_or_path != str(entry)
    cached = load_default_model()
    assert "converting" not in capsys.readouterr().err
    assert cached.name_or_path == str(entry)  # read from the entry: no conversion ran
    assert cached.dtype == torch.float32 and cached.config._attn_implementation == "sdpa"
    ids = torch.arange(100, 164)[None]  # [1, 64]
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, cached(ids).logits)

    from_gguf, from_entry = load_default_tokenizer(disk_cache=False), load_default_tokenizer()
    assert from_entry.name_or_path == str(entry) and from_gguf.name_or_path != str(entry)
    text = load_default_text()[:20000]
    assert from_gguf(text).input_ids == from_entry(text).input_ids
    chat = [{"role": "user", "content": "What does the Python 'with' statement do?"}]
    assert from_gguf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        from_entry.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    assert (from_gguf.eos_token, from_gguf.bos_token, from_gguf.pad_token) == (
        from_entry.eos_token,
        from_entry.bos_token,
        from_entry.pad_token,
    )


def test_plain_weights_keep_ties_drop_the_quantization_config_and_refuse_packed_tensors(tmp_path):
    import json

    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves on the config
    PlainWeights(model).save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded), logits(model))
    with torch.no_grad():
        model.model.norm.weight = torch.nn.Parameter(torch.ones(32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="model.norm.weight holds torch.int8"):
        PlainWeights(model).save_pretrained(tmp_path / "packed")
