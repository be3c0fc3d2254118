"""The model behind ``kvplus bench`` and ``benchmarks/decode_step.py``: real weights, or random ones from a config.

Decode time and bytes depend on the shapes (layers, heads, head_dim, vocabulary), not on the weights' values, so
``random_weights=True`` measures a model whose weights are not at hand from its config alone: a named shape of
:data:`SHAPES` (no file, no network), a local folder or ``config.json``, or a Hub id when online.
"""

from __future__ import annotations

import torch

from .models import DEFAULT_MODEL, parse_dtype

# name -> LlamaConfig keywords of a random-init model (no download); llama-tiny checks the path on CPU
SHAPES = {
    "llama-3.1-8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0),
    "llama-tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=128, vocab_size=96, max_position_embeddings=65536),
}


def model_config(model: str):
    """A config for ``model``: a name of :data:`SHAPES`, else what :func:`hf_kvplus.planner.load_config` reads."""
    if model in SHAPES:
        from transformers import LlamaConfig

        return LlamaConfig(**SHAPES[model])
    from ..planner import load_config

    return load_config(model)


def random_model(model: str, dtype="float32", device: str = "cpu"):
    """A causal LM with ``model``'s shapes and seeded random weights, built directly on ``device`` in ``dtype``.

    Args:
        model (`str`): a name of :data:`SHAPES`, ``"default"``, a local folder / ``config.json`` / ``.gguf``, or a Hub id.
        dtype (`str` or `torch.dtype`, defaults to ``"float32"``): see :func:`hf_kvplus.eval.parse_dtype`.
        device (`str`, defaults to ``"cpu"``): where to build it.

    Raises:
        ValueError: ``model`` is unknown or (``llama-3.1-8b``) too large for a CPU run.

    Example:

    ```python
    >>> model = random_model("llama-tiny")
    >>> model.config.num_hidden_layers
    2
    ```"""
    from transformers import AutoModelForCausalLM

    if model == "llama-3.1-8b" and not str(device).startswith("cuda"):
        raise ValueError("random weights for llama-3.1-8b are for --device cuda only (8B parameters: 16 GB in bf16)")
    config = model_config(model)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(parse_dtype(dtype))
    try:
        with torch.device(device):
            built = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return built.eval()


def load_for_bench(model: str = DEFAULT_MODEL, dtype="float32", device: str = "cpu", random_weights: bool = False):
    """``(model, input_ids or None, description)`` for :func:`hf_kvplus.bench.decode_benchmark`.

    With real weights on the embedded model the ids are the default text's tokens; otherwise ``None``
    (seeded random ids). A :data:`SHAPES` name always means random weights.

    Example:

    ```python
    >>> model, ids, what = load_for_bench("llama-tiny", random_weights=True)
    >>> what
    'random-init llama-tiny'
    ```"""
    if random_weights or model in SHAPES:
        return random_model(model, dtype, device), None, f"random-init {model}"
    from .models import load_default_text, load_model_and_tokenizer

    loaded, tokenizer = load_model_and_tokenizer(model, dtype, device)
    ids = tokenizer(load_default_text(), return_tensors="pt").input_ids[0] if model == DEFAULT_MODEL else None
    name = "SmolLM2-135M-Instruct (embedded GGUF)" if model == DEFAULT_MODEL else model
    return loaded, ids, name
