"""The user's path: ``kvplus generate`` and ``kvplus bench`` on a model of one's own, token counts such as 128k."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import save_tiny, tiny_model

from hf_kvplus.cli import main, tokens
from hf_kvplus.eval.bench_model import SHAPES, random_model
from hf_kvplus.eval.generate import format_generation, generate_with_cache


@pytest.mark.parametrize("text, count", [("8192", 8192), ("128k", 131072), ("1M", 1048576), ("32_768", 32768)])
def test_token_counts_take_k_and_m(text, count):
    assert tokens(text) == count


@pytest.mark.parametrize("text", ["12x", "k", "1.5k", ""])
def test_bad_token_counts_name_the_value(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"bad token count {text!r}"):
        tokens(text)


def test_generate_on_a_local_folder_compares_with_dynamic(tmp_path, capsys):
    folder = save_tiny(tmp_path / "tiny")
    assert main(["generate", folder, "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2, "--cache", "sink",
                 "--budget", "16", "--max-new-tokens", "12", "--compare", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    sink = next(line for line in out.splitlines() if line.strip().startswith("sink: cache holds"))
    dense = next(line for line in out.splitlines() if line.strip().startswith("dynamic: cache holds"))
    assert "time to first token" in sink and "tokens/s" in sink and "peak RSS" in sink
    held = {name: int(line.split("(")[1].split(" bytes")[0].replace(",", "")) for name, line in
            (("sink", sink), ("dynamic", dense))}
    assert held["sink"] < held["dynamic"] / 2  # 16 tokens per layer against 100+ prompt and new tokens
    assert "the bytes of dynamic and generated" in out


def test_generate_rows_count_the_cache_and_the_new_tokens():
    model = tiny_model("llama-gqa")

    class Tokenizer:  # a character tokenizer without a chat template
        pad_token_id, eos_token_id, chat_template = 0, None, None

        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            import torch

            return argparse.Namespace(input_ids=torch.tensor([[3 + ord(c) % 90 for c in text]]))

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(40 + int(i) % 50) for i in ids)

    rows = generate_with_cache(model, Tokenizer(), "x" * 40, "int4", max_new_tokens=5, compare=True)
    assert [r["strategy"] for r in rows] == ["int4", "dynamic"]
    assert all(r["new_tokens"] == 5 and r["prompt_tokens"] == 40 and len(r["text"]) == 5 for r in rows)
    assert rows[0]["cache_bytes"] > 0 and rows[1]["cache_bytes"] == 2 * 2 * 2 * 44 * 16 * 4  # k+v, layers, heads: 40 + 4 tokens (the last is never fed)
    assert rows[0]["peak_gpu_mib"] is None and rows[0]["decode_tok_s"] > 0 and rows[0]["ttft_s"] > 0
    assert "int4 holds" in format_generation(rows)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        generate_with_cache(model, Tokenizer(), "x", "int4", max_new_tokens=0)


@pytest.mark.parametrize("argv, message", [
    (["--cache", "sink"], "'sink' evicts tokens: give it a budget"),
    (["--cache", "bogus", "--budget", "8"], "unknown cache 'bogus'"),
    (["--cache", "int4", "--device", "cuda:0"], "no CUDA device"),
])
def test_generate_refuses_bad_settings_before_loading(tmp_path, capsys, argv, message):
    folder = save_tiny(tmp_path / "tiny")
    if "cuda:0" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: the refusal is for machines without it")
    assert main(["generate", folder, *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_random_weights_prints_a_table_and_json(capsys):
    argv = ["bench", "llama-tiny", "--random-weights", "--context", "256", "--strategies", "dense", "sink",
            "--budget", "64", "--steps", "2", "--rounds", "1", "--device", "cpu"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "random-init llama-tiny, float32, cpu" in table and "| sink | hf_kvplus | 256 | 1 |" in table
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in report["rows"]}
    assert set(rows) == {"dense", "sink"} and rows["sink"]["budget"] == 64
    assert rows["sink"]["cache_bytes"] < rows["dense"]["cache_bytes"] / 2 and rows["dense"]["step_ms"] > 0
    assert main(["bench", "llama-tiny", "--context", "64", "--strategies", "nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err


def test_random_weights_follow_a_config_and_refuse_8b_on_cpu(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    model = random_model(folder)
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert random_model("llama-tiny").config.hidden_size == SHAPES["llama-tiny"]["hidden_size"]
    with pytest.raises(ValueError, match="llama-3.1-8b are for --device cuda only"):
        random_model("llama-3.1-8b", device="cpu")


def test_memory_defaults_to_the_model_dtype_and_counts_weights(tmp_path, capsys):
    import torch

    from hf_kvplus.planner import load_config, plan, weight_bytes

    folder = save_tiny(tmp_path / "tiny")
    config = load_config(folder)
    report = plan(config, 128 * 1024)  # the tiny model was saved in float32
    assert report["model"]["dtype"] == "float32" and report["bytes_per_token"]["dense"] == 2 * 2 * 2 * 16 * 4
    parameters = sum(p.numel() for p in tiny_model("llama-gqa").parameters())
    assert report["weights"] == {"parameters": parameters, "bytes": 4 * parameters}
    assert weight_bytes(config, torch.bfloat16) == (parameters, 2 * parameters)
    dense = report["rows"][0]
    assert dense["with_weights"] == dense["bytes"] + 4 * parameters
    config.dtype = torch.bfloat16  # a model saved in bf16 is planned in bf16
    assert plan(config, 10)["bytes_per_token"]["dense"] == 2 * 2 * 2 * 16 * 2
    assert main(["memory", folder, "--context", "128k"]) == 0
    out = capsys.readouterr().out
    assert "context 131,072 tokens" in out and f"weights: {parameters:,} parameters" in out and "positions" in out


@pytest.mark.integration
def test_memory_of_the_embedded_model_is_float32(capsys):
    assert main(["memory", "default", "--context", "1M"]) == 0
    out = capsys.readouterr().out
    assert "dense KV per token: 46,080 bytes" in out and "context 1,048,576 tokens" in out
    assert "weights: 134,515,008 parameters" in out


def test_loading_hides_the_gguf_conversion_bar_and_keeps_other_messages(capsys):
    import sys

    from tqdm.auto import tqdm
    from transformers import logging

    from hf_kvplus.eval.models import quiet_gguf_conversion

    enabled = logging.is_progress_bar_enabled()
    with quiet_gguf_conversion():
        assert not logging.is_progress_bar_enabled()  # transformers' own bars are off while loading
        for _ in tqdm(range(272), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        print("a real warning", file=sys.stderr)
    assert logging.is_progress_bar_enabled() == enabled
    err = capsys.readouterr().err
    assert "GGUF tensors" not in err and "a real warning" in err
