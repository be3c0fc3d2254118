"""Decode step time, prefill time and memory of every strategy side by side, in one process (nothing runs at import).

:func:`decode_benchmark` gives each ``(context, batch)`` a fresh cache of ``dense`` (``DynamicCache``),
``tf-window`` (transformers' ``DynamicSlidingWindowLayer`` at the same budget), ``tf-quanto-int4``
(``QuantizedCache`` with optimum-quanto) and every registered hf_kvplus strategy and preset, prefills it in
chunks (timed), then times greedy single-token steps in interleaved rounds so that load from other processes
affects all alike. :func:`render_markdown` and :func:`slower_sentences` turn the rows into a table and sentences.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.util
import inspect
import statistics
import sys
import time

import torch
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ._compat import cache_kwargs
from .hooks import attach, detach
from .memory import cache_nbytes, current_rss_bytes, peak_memory, reset_peak_memory
from .prefill import prefill
from .prefix import PrefixStore
from .registry import get_spec, list_caches, list_presets, make_cache, resolve
from .validate import check_int

__all__ = ["decode_benchmark", "plan_strategies", "render_markdown", "slower_sentences", "sliding_window_cache"]

PEERS = ("dense", "tf-window", "tf-quanto-int4")
COLUMNS = ["strategy", "library", "context", "batch", "prefill_s", "prefill_vs_dense", "step_ms", "step_vs_dense",
           "step_vs_tf_window", "cache_mib", "bytes_vs_dense", "peak_mib"]


def _ours() -> list[str]:
    return [name for name in list_caches() if name != "dynamic"] + list(list_presets())


def _configuration(name: str) -> tuple:
    """``(strategy, every keyword with its default)``: two names with the same configuration build the same cache."""
    spec, kwargs = resolve(name)
    defaults = {key: p.default for key, p in inspect.signature(spec.factory).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return spec.name, sorted({**defaults, **kwargs}.items(), key=lambda item: item[0])


def plan_strategies(names=None) -> tuple[list[str], dict[str, str]]:
    """The strategies :func:`decode_benchmark` can run here, and why the others are left out.

    Args:
        names (`list[str]`, *optional*): labels to check (``dense``, ``tf-window``, ``tf-quanto-int4`` or a
            registered hf_kvplus strategy or preset); by default all of them, without names whose
            configuration repeats an earlier one (``quantized`` is ``int4``).

    Returns:
        `tuple`: ``(labels to run, {label: reason it is skipped})``.

    Example:

    ```python
    >>> runnable, skipped = plan_strategies()
    >>> skipped.get("quantized")
    'same configuration as int4'
    ```"""
    ours = _ours()
    default = names is None
    names = [*PEERS, *ours] if default else list(names)
    # a strategy whose defaults equal a preset runs once, under the preset's name (int4 reads better than quantized)
    presets = {repr(_configuration(name)): name for name in list_presets()} if default else {}
    runnable, skipped = [], {}
    for name in names:
        if name not in PEERS and name not in ours:
            raise ValueError(f"unknown strategy {name!r}; choose from {[*PEERS, *ours]}")
        if name == "tf-quanto-int4" and importlib.util.find_spec("optimum.quanto") is None:
            skipped[name] = "optimum-quanto is not installed (pip install optimum-quanto)"
        elif name in ours and presets.get(repr(_configuration(name)), name) != name:
            skipped[name] = f"same configuration as {presets[repr(_configuration(name))]}"
        else:
            runnable.append(name)
    return runnable, skipped


def sliding_window_cache(model, budget: int) -> Cache:
    """transformers' own sliding window at ``budget``: a ``DynamicSlidingWindowLayer`` in every layer.

    Args:
        model (`PreTrainedModel`): the model (its config gives the number of layers).
        budget (`int`): tokens held after each forward (the layer keeps ``sliding_window - 1``).

    Raises:
        ValueError: ``budget`` below 1.

    Example:

    ```python
    >>> cache = sliding_window_cache(model, 512)  # the peer our sink and window caches are timed against
    ```
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget!r}")
    return Cache(layers=[DynamicSlidingWindowLayer(sliding_window=budget + 1)
                         for _ in range(model.config.num_hidden_layers)])


def _build(model, label: str, budget: int, ids: torch.Tensor):
    """A fresh cache for ``label``; ``ids`` ([batch, context]) only matter to the prefix cache."""
    if label == "dense":
        return DynamicCache(config=model.config)
    if label == "tf-window":
        return sliding_window_cache(model, budget)
    if label == "tf-quanto-int4":
        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    if get_spec(label).name == "prefix":
        store = PrefixStore()  # a cold store: nothing to reuse but what the rows share
        cache = store.cache_for(model, ids)
        cache.bench_store = store  # a cache holds its store weakly: keep it alive as long as the cache
        return cache
    if get_spec(label).evicting:
        return make_cache(label, model, budget=budget)
    return make_cache(label, model)


def _prepare(model, label: str) -> None:
    """Put ``model`` in the state ``label`` is used in: plain for transformers' caches (no hook, SDPA), and for
    ours what ``make_cache`` sets up (the input hook, plus the ``"kvplus"`` attention for strategies that score)."""
    detach(model)
    if label not in PEERS:
        spec = get_spec(label)
        attach(model, attention_scores=spec.attention_scores, split_attention=spec.split_attention)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device, reset: bool) -> int:
    """Reset the peak and return what is allocated (CUDA) or resident (CPU) now; or return the peak since.

    On CPU, memory freed by earlier caches is first handed back to the OS (glibc ``malloc_trim``): otherwise a
    cache reuses their heap pages and its RSS delta reads 0."""
    cuda = device.type == "cuda"
    if reset:
        if not cuda and sys.platform.startswith("linux") and ctypes.util.find_library("c"):
            try:
                ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
            except (OSError, AttributeError):  # not glibc
                pass
        reset_peak_memory(device)
        return torch.cuda.memory_allocated(device) if cuda else current_rss_bytes()
    return peak_memory(device)["device_peak_bytes" if cuda else "peak_rss_bytes"]


@torch.no_grad()
def _step(model, state: dict, device: torch.device) -> float:
    began = time.perf_counter()
    logits = model(state["token"], **cache_kwargs(state["cache"], model), use_cache=True).logits
    state["token"] = logits[:, -1:].argmax(-1)  # [batch, 1]
    _sync(device)
    return time.perf_counter() - began


def _prefill_all(model, labels, ids, budget, chunk_size, device, log) -> dict:
    states = {}
    for label in labels:
        state = states[label] = {"error": None}
        try:
            _prepare(model, label)
            cache = _build(model, label, budget, ids)
            before = _memory(device, reset=True)
            began = time.perf_counter()
            logits = prefill(model, ids, cache, chunk_size=chunk_size).logits
            _sync(device)
            state.update(prefill_s=time.perf_counter() - began, cache=cache, token=logits[:, -1:].argmax(-1),
                         cache_bytes=cache_nbytes(cache), peak_bytes=_memory(device, reset=False), times=[])
            state["peak_delta_bytes"] = max(0, state["peak_bytes"] - before)
            _step(model, state, device)  # one untimed warm-up step
        except Exception as error:  # noqa: BLE001 - one broken strategy must not lose the others' rows
            state.update(error=f"{type(error).__name__}: {error}", cache=None)
        if log:
            shown = state["error"] or f"prefilled in {state['prefill_s']:.1f} s, {state['cache_bytes'] / 2**20:.1f} MiB"
            log(f"{label:>16} {ids.shape[1]}x{ids.shape[0]}: {shown}")
    return states


def _ratios(rows: list[dict]) -> None:
    for row in rows:
        for base_label, suffix in (("dense", "dense"), ("tf-window", "tf_window")):
            base = next((r for r in rows if r["strategy"] == base_label and "error" not in r), None)
            if base is None or "error" in row:
                continue
            row[f"step_vs_{suffix}"] = row["step_ms"] / base["step_ms"]
            row[f"prefill_vs_{suffix}"] = row["prefill_s"] / base["prefill_s"]
            row[f"bytes_vs_{suffix}"] = row["cache_bytes"] / base["cache_bytes"]


def decode_benchmark(model, strategies=None, contexts=(2048, 8192), batch_sizes=(1, 4), budget: int = 512,
                     steps: int = 8, rounds: int = 3, device=None, input_ids=None, chunk_size: int = 512,
                     max_batch_tokens: int | None = 8192, log=None, shared_prefix: int = 0) -> list[dict]:
    """Prefill seconds, decode milliseconds per step and bytes of each strategy, interleaved in one process.

    Args:
        model (`PreTrainedModel`): a causal LM, already on ``device`` in the dtype to measure.
        strategies (`list[str]`, *optional*): labels (see :func:`plan_strategies`); defaults to every runnable one.
        contexts (`tuple[int]`, *optional*, defaults to ``(2048, 8192)``): prompt tokens per row.
        batch_sizes (`tuple[int]`, *optional*, defaults to ``(1, 4)``): rows per batch.
        budget (`int`, *optional*, defaults to 512): tokens kept by ``tf-window`` and evicting strategies.
        steps (`int`, *optional*, defaults to 8): greedy decode steps per strategy per round.
        rounds (`int`, *optional*, defaults to 3): interleaved rounds; the step time is the median of all.
        device (`str` or `torch.device`, *optional*): where the model is; defaults to the model's device.
        input_ids (`torch.LongTensor`, *optional*): 1-D token ids; row ``b`` of a batch is the slice
            ``[b * context, (b + 1) * context)``. Defaults to seeded random ids.
        chunk_size (`int`, *optional*, defaults to 512): prefill tokens per forward, for every strategy.
        max_batch_tokens (`int`, *optional*, defaults to 8192): skip configurations with ``context * batch``
            above this (``None``: every pair).
        log (`Callable[[str], None]`, *optional*): called with a progress line per strategy (e.g. ``print``).
        shared_prefix (`int`, *optional*, defaults to 0): the rows of a batch share their first ``shared_prefix``
            tokens (row 0's), as requests on one system prompt do; every strategy holds the same tokens, and
            the ``prefix`` cache (a cold store) publishes them at prefill and holds them once for all rows.

    Returns:
        `list[dict]`: one row per (strategy, context, batch): ``key``, ``strategy``, ``library``, ``context``,
        ``batch``, ``budget``, ``prefill_s``, ``step_ms`` (median), ``steps_timed``, ``cache_bytes``
        (:func:`hf_kvplus.cache_nbytes` after prefill), ``peak_bytes`` (during prefill: CUDA
        ``max_memory_allocated``, or the CPU process's peak RSS) and ``peak_delta_bytes`` (that peak minus
        what was allocated or resident before; on CPU, freed heap is handed back to the OS first), ``memory``, and ratios ``*_vs_dense``, ``*_vs_tf_window``
        of ``step``, ``prefill`` and ``bytes``. A strategy that fails has ``error`` instead of numbers.
        Transformers' caches run on the plain model (SDPA, no hook), ours as ``make_cache`` sets the model up;
        the model is left plain (:func:`hf_kvplus.detach`) afterwards.

    Example:

    ```python
    >>> rows = decode_benchmark(model, ["dense", "tf-window", "sink"], contexts=(2048,), batch_sizes=(1,),
    ...                         input_ids=ids, log=print)
    >>> print(render_markdown(rows))
    ```
    """
    for name, value in (("budget", budget), ("steps", steps), ("rounds", rounds), ("chunk_size", chunk_size)):
        check_int(name, value)
    labels = plan_strategies(strategies)[0]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pairs = [(c, b) for c in contexts for b in batch_sizes if max_batch_tokens is None or c * b <= max_batch_tokens]
    if not pairs:
        raise ValueError(f"no (context, batch) of {list(contexts)} x {list(batch_sizes)} fits {max_batch_tokens=}")
    longest = max(c * b for c, b in pairs)
    if input_ids is None:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, model.config.vocab_size, (longest,), generator=generator)
    input_ids = torch.as_tensor(input_ids).reshape(-1)
    if input_ids.numel() < longest:
        raise ValueError(f"input_ids has {input_ids.numel()} tokens; context x batch needs {longest}")
    if any(shared_prefix >= c for c, _ in pairs):
        raise ValueError(f"shared_prefix={shared_prefix} must be below every context, got contexts {list(contexts)}")
    rows = []
    for context, batch in pairs:
        ids = input_ids[: context * batch].reshape(batch, context).clone().to(device)  # [batch, context]
        ids[:, :shared_prefix] = ids[0, :shared_prefix]
        states = _prefill_all(model, labels, ids, budget, chunk_size, device, log)
        live = {label: state for label, state in states.items() if state["error"] is None}
        for _ in range(rounds):  # interleaved: load from other processes affects every strategy alike
            for label, state in live.items():
                if state["error"] is None:
                    try:
                        _prepare(model, label)
                        state["times"] += [_step(model, state, device) for _ in range(steps)]
                    except Exception as error:  # noqa: BLE001 - as in _prefill_all
                        state.update(error=f"{type(error).__name__} while decoding: {error}", cache=None)
        found = []
        for label, state in states.items():
            row = {"key": f"{label}@{context}x{batch}", "strategy": label, "library": "transformers" if label in PEERS else "hf_kvplus",
                   "context": context, "batch": batch, "shared_prefix": shared_prefix,
                   "budget": budget if label == "tf-window" or (label not in PEERS and get_spec(label).evicting) else None}
            if state["error"]:
                row["error"] = state["error"]
            else:
                row.update(prefill_s=state["prefill_s"], step_ms=1000 * statistics.median(state["times"]),
                           steps_timed=len(state["times"]), cache_bytes=state["cache_bytes"],
                           peak_bytes=state["peak_bytes"], peak_delta_bytes=state["peak_delta_bytes"],
                           memory="cuda max_memory_allocated" if device.type == "cuda" else "cpu peak rss")
            found.append(row)
            state["cache"] = None  # free before the next configuration
        gc.collect()
        _ratios(found)
        rows += found
        if log:
            log(f"{context}x{batch}: " + ", ".join(f"{r['strategy']} {r.get('step_ms', float('nan')):.1f} ms"
                                                  for r in found))
    _prepare(model, "dense")  # leave the model as it came (assuming it was plain)
    return rows


def render_markdown(rows: list[dict]) -> str:
    """A Markdown table of :func:`decode_benchmark` rows, one block per (context, batch).

    Args:
        rows (`list[dict]`): rows from :func:`decode_benchmark`.

    Example:

    ```python
    >>> print(render_markdown(decode_benchmark(model, ["dense", "sink"], contexts=(1024,), batch_sizes=(1,))))
    ```"""
    from .eval.report import markdown_table

    def fmt(value, spec):
        return None if value is None else format(value, spec)

    shown = []
    for row in rows:
        if "error" in row:
            shown.append({**row, "step_ms": f"error: {row['error']}"})
            continue
        shown.append({**row, "prefill_s": fmt(row["prefill_s"], ".2f"), "step_ms": fmt(row["step_ms"], ".1f"),
                      "cache_mib": fmt(row["cache_bytes"] / 2**20, ".1f"),
                      "peak_mib": fmt(row["peak_delta_bytes"] / 2**20, ".0f"),
                      **{k: fmt(row.get(k), ".2f") for k in ("prefill_vs_dense", "step_vs_dense", "step_vs_tf_window",
                                                              "bytes_vs_dense")}})
    return markdown_table(shown, COLUMNS)


def slower_sentences(rows: list[dict], tolerance: float = 0.05) -> list[str]:
    """One sentence per hf_kvplus row whose decode step or prefill is slower than ``dense`` or ``tf-window``.

    Strategies with a budget are compared with both; those that keep every token (quantized, prefix) with
    ``dense`` only, since a window doing less work is no like-for-like baseline for them.

    Args:
        rows (`list[dict]`): rows from :func:`decode_benchmark` (ratios from the same run).
        tolerance (`float`, *optional*, defaults to 0.05): ratios up to ``1 + tolerance`` count as a tie.

    Example:

    ```python
    >>> for sentence in slower_sentences(rows):
    ...     print(sentence)
    ```"""
    sentences = []
    for row in rows:
        if row["library"] != "hf_kvplus" or "error" in row:
            continue
        parts = []
        # a cache that keeps every token is compared with dense only; one with a budget with tf-window too
        bases = (("dense", "dense"), ("tf_window", "tf-window")) if row.get("budget") else (("dense", "dense"),)
        for what, shown in (("step", f"decode {row['step_ms']:.1f} ms/step"),
                            ("prefill", f"prefill {row['prefill_s']:.1f} s")):
            behind = [f"{row[f'{what}_vs_{key}']:.2f}x {name}" for key, name in bases
                      if row.get(f"{what}_vs_{key}") is not None and row[f"{what}_vs_{key}"] > 1 + tolerance]
            if behind:
                parts.append(f"{shown} = " + " and ".join(behind))
        if parts:
            sentences.append(f"`{row['strategy']}` at {row['context']} tokens x batch {row['batch']}: "
                             + "; ".join(parts) + ".")
    return sentences
