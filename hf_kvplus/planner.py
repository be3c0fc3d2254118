"""Capacity planning: how many bytes the KV cache of a workload takes, per strategy, before running anything.

Every figure comes from the caches' own ``predict_nbytes`` (:meth:`KVPlusCache.predict_nbytes`, the stores'
``predict_nbytes``), which the tests check against :func:`hf_kvplus.cache_nbytes` on real caches. Strategies
are read from the registry: evicting ones at a budget, the others at their sweep (``int8``/``int4``/``int2``).

    kvplus memory default --context 128k --batch 4   # the model's own dtype (float32 for the embedded model)
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig

from .config import kv_geometry, text_config
from .eval.models import parse_dtype
from .registry import get_spec, list_caches, make_cache
from .storage.base import DenseStore
from .validate import check_int


def load_config(model: str | None = None) -> PreTrainedConfig:
    """A model config without its weights: ``None``/``"default"`` (the embedded GGUF), a folder holding
    ``config.json``, a ``config.json`` or ``.gguf`` file, or a Hub id (not with ``HF_HUB_OFFLINE=1``)."""
    if model in (None, "default"):
        from .eval.models import gguf_kwargs

        return AutoConfig.from_pretrained(**gguf_kwargs())
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{model!r} is a folder without config.json")
        return AutoConfig.from_pretrained(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
            if "model_type" not in raw:
                raise ValueError(f"{model!r} has no model_type: not a transformers config.json")
            return AutoConfig.for_model(**raw)
        raise ValueError(f"{model!r} is neither a config.json nor a .gguf file")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or model.startswith((".", "/")) or model.count("/") > 1:
        raise FileNotFoundError(f"model {model!r} is not a local folder or file, and it cannot be read from the Hub "
                                "(HF_HUB_OFFLINE=1, or not a Hub id)")
    return AutoConfig.from_pretrained(model)


def model_dtype(config: PreTrainedConfig):
    """The dtype the model computes in when loaded as saved: its config's ``dtype``, else float32 (the embedded
    GGUF model loads in float32, as transformers does when a config names none)."""
    found = getattr(text_config(config), "dtype", None) or getattr(config, "dtype", None)
    return parse_dtype(found) if found is not None and str(found) != "auto" else parse_dtype("float32")


def weight_bytes(config: PreTrainedConfig, dtype) -> tuple[int, int]:
    """``(parameters, bytes)`` of the model's weights in ``dtype``, counted on the meta device (nothing allocated;
    tied embeddings counted once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return count, count * parse_dtype(dtype).itemsize


def _check(name: str, value, minimum: int) -> int:
    return check_int(name, value, minimum)


def plan(config: PreTrainedConfig, context: int, batch: int = 1, dtype=None, budget: int = 1024,
         prefix: int = 0) -> dict:
    """KV cache bytes of ``batch`` sequences of ``context`` tokens, for dense and every registered strategy.

    Args:
        config (`PreTrainedConfig`): the model's config (see :func:`load_config`).
        context (`int`): tokens per sequence (prompt plus generated).
        batch (`int`, defaults to 1): sequences held at once.
        dtype (`str` or `torch.dtype`, *optional*): the dtype keys, values and weights are held in; by default the
            model's own (:func:`model_dtype`: float32 for the embedded model, 46,080 KV bytes per token).
        budget (`int`, defaults to 1024): tokens per layer kept by evicting strategies.
        prefix (`int`, defaults to 0): tokens of a prompt prefix shared by the whole batch (the ``prefix`` row).

    Returns:
        `dict`: ``model`` (geometry), ``bytes_per_token`` (dense, and with full multi-head attention), ``weights``
        (``parameters``, ``bytes``, or ``None`` when the architecture cannot be built from its config), and
        ``rows``: ``strategy``, ``settings``, ``tokens_held`` per layer and row, ``bytes`` for the workload (every
        tensor the cache holds: positions, scores, scales, residual, RoPE tables), ``vs_dense``, ``with_weights``.

    Example:

    ```python
    >>> report = plan(load_config("default"), context=8192, batch=4)
    >>> [(r["strategy"], r["bytes"]) for r in report["rows"]][:2]
    ```
    """
    context, batch = _check("context", context, 1), _check("batch", batch, 1)
    budget, prefix = _check("budget", budget, 1), _check("prefix", prefix, 0)
    if prefix > context:
        raise ValueError(f"prefix ({prefix}) must not exceed context ({context})")
    dtype = model_dtype(config) if dtype is None else parse_dtype(dtype)
    layers, kv_heads, head_dim = kv_geometry(config)
    heads = text_config(config).num_attention_heads
    dense_token = DenseStore().predict_nbytes(1, kv_heads, 1, head_dim, dtype) * layers
    dense = dense_token * context * batch
    rows = [{"strategy": "dynamic", "settings": "every token", "tokens_held": context, "bytes": dense}]
    for name in list_caches():
        spec = get_spec(name)
        if name == "dynamic" or (name == "prefix" and not prefix):
            continue
        values = [v if isinstance(v, (list, tuple)) else [v] for v in spec.sweep.values()]
        for combination in itertools.product(*values):
            kwargs = dict(zip(spec.sweep, combination, strict=True))
            if spec.evicting:
                kwargs = {**kwargs, "budget": budget}
            tokens = min(context, budget) if spec.evicting else context
            try:
                cache = make_cache(name, config, **kwargs)
            except (ValueError, TypeError) as error:  # e.g. a strategy this architecture does not support
                rows.append({"strategy": name, "settings": f"not available: {error}", "tokens_held": tokens,
                             "bytes": None})
                continue
            if name == "prefix":
                held = cache.predict_nbytes(context, batch, dtype, shared=prefix)
                settings = f"prefix={prefix // 16 * 16} shared by {batch} rows"
            else:
                held = cache.predict_nbytes(context, batch, dtype)
                settings = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
            rows.append({"strategy": name, "settings": settings, "tokens_held": tokens, "bytes": held})
    try:
        parameters, weights = weight_bytes(config, dtype)
    except (ValueError, KeyError, TypeError):  # an architecture transformers cannot build from this config
        parameters = weights = None
    for row in rows:
        row["vs_dense"] = None if row["bytes"] is None else row["bytes"] / dense
        row["with_weights"] = None if row["bytes"] is None or weights is None else row["bytes"] + weights
    return {
        "model": {"model_type": text_config(config).model_type, "layers": layers, "attention_heads": heads,
                  "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch.")},
        "context": context, "batch": batch, "budget": budget, "prefix": prefix,
        "bytes_per_token": {"dense": dense_token, "full_mha": dense_token * heads // kv_heads},
        "gqa_saving": 1 - kv_heads / heads, "rows": rows,
        "weights": None if weights is None else {"parameters": parameters, "bytes": weights},
    }


def _size(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def format_plan(report: dict) -> str:
    """The plan as text: geometry, bytes per token, GQA saving, and a table of strategies."""
    m, per = report["model"], report["bytes_per_token"]
    kind = "multi-query" if m["kv_heads"] == 1 else "grouped-query" if m["kv_heads"] < m["attention_heads"] else "multi-head"
    lines = [
        f"{m['model_type']}: {m['layers']} layers, {m['attention_heads']} attention heads, {m['kv_heads']} KV heads "
        f"({kind}), head_dim {m['head_dim']}, {m['dtype']}",
        f"dense KV per token: {per['dense']:,} bytes (2 x {m['layers']} x {m['kv_heads']} x {m['head_dim']} x "
        f"{per['dense'] // (2 * m['layers'] * m['kv_heads'] * m['head_dim'])} bytes)",
        f"with full multi-head attention ({m['attention_heads']} KV heads) it would be {per['full_mha']:,} bytes: "
        f"{kind} attention already saves {report['gqa_saving']:.0%}",
        f"workload: batch {report['batch']} x context {report['context']:,} tokens (evicting strategies: budget "
        f"{report['budget']})",
        "weights: " + ("not counted (this architecture cannot be built from its config)" if report["weights"] is None
                       else f"{report['weights']['parameters']:,} parameters, {_size(report['weights']['bytes'])} in "
                            f"{m['dtype']}"),
        "KV bytes count every tensor a cache holds: keys and values, positions (int64 where a cache keeps them), "
        "scores, quantization scales and residual, RoPE tables", "",
        f"{'strategy':10s} {'settings':34s} {'tokens/layer':>12s} {'KV bytes':>14s} {'vs dense':>9s} "
        f"{'+ weights':>14s}",
    ]
    for r in report["rows"]:
        ratio = "" if r["vs_dense"] is None else f"{r['vs_dense']:.3f}x"
        lines.append(f"{r['strategy']:10s} {r['settings'][:34]:34s} {r['tokens_held']:>12,} {_size(r['bytes']):>14s} "
                     f"{ratio:>9s} {_size(r['with_weights']):>14s}")
    return "\n".join(lines)


__all__ = ["format_plan", "load_config", "plan"]
