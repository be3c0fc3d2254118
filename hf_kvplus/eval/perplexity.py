"""Perplexity protocols (see ``DESIGN.md`` section 4) and decode speed, through any cache.

* :func:`streaming_perplexity`: feed a text through the cache, score every next token, let the
  cache evict as it goes (StreamingLLM / H2O protocol). ``chunk_size=1`` is exact; larger chunks
  are a faster approximation (attention within a chunk sees up to ``chunk_size - 1`` extra tokens)
  and the returned row says which was used.
* :func:`compression_perplexity`: prefill ``context_length`` tokens through the cache, then score
  the next ``target_length`` tokens teacher-forced in one forward (kvpress protocol).
* :func:`decode_speed`: greedy decode tokens per second after a prefill.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from .._compat import cache_kwargs
from ..memory import cache_nbytes, current_rss_bytes, device_peak_bytes, peak_rss_bytes
from ..validate import check_int

MIB = 2**20


def progress_bar(iterable, enabled: bool, desc: str, total: int | None = None):
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (the eval package's one progress bar), else unchanged."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, float32: ``logits`` ``[n, vocab]``, ``targets`` ``[n]`` -> ``[n]``."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def flat_ids(token_ids) -> torch.Tensor:
    """One sequence of token ids as ``[n]`` int64 from ``[n]`` or ``[1, n]``; ``ValueError`` for a batch or n < 2."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"expected one sequence of token ids, got a batch of shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"expected a 1-D sequence of at least 2 token ids, got shape {tuple(ids.shape)}")
    return ids.long()


@torch.no_grad()
def streaming_perplexity(
    model,
    cache,
    token_ids,
    num_tokens: int | None = None,
    chunk_size: int = 1,
    report_every: int = 512,
    progress: bool = False,
) -> dict:
    """Stream ``token_ids`` through ``model`` with ``cache`` and score every next token.

    Args:
        model: a causal LM.
        cache (`transformers.Cache`): an empty cache (it is filled and evicts as text streams).
        token_ids (`torch.LongTensor`): ``[n]`` or ``[1, n]``.
        num_tokens (`int`, *optional*): stream only the first ``num_tokens`` tokens.
        chunk_size (`int`, defaults to 1): tokens per forward; 1 is exact, more is an approximation.
        report_every (`int`, defaults to 512): tokens per reported window of the perplexity and memory curves.
        progress (`bool`): show a progress bar.

    Returns:
        `dict`: ``ppl``, ``nll``, ``tokens_scored``, ``chunk_size``, ``exact`` (chunk_size == 1),
        ``cache_bytes`` (at the end), ``cache_bytes_peak``, ``window_ppl`` and ``window_cache_bytes``
        / ``window_rss_bytes`` (one per ``report_every`` tokens), ``seconds``, ``tokens_per_second``.

    Example:

    ```python
    >>> streaming_perplexity(model, make_cache("sink", model, budget=256), ids, num_tokens=4096)["ppl"]
    ```
    """
    ids = flat_ids(token_ids)
    if num_tokens is not None:
        if num_tokens < 2 or num_tokens > ids.numel():
            raise ValueError(f"num_tokens must be between 2 and {ids.numel()} (the text length), got {num_tokens}")
        ids = ids[:num_tokens]
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    device = model.device
    ids = ids.to(device)
    total = ids.numel()
    nll = torch.empty(total - 1, dtype=torch.float32)
    peak = 0
    window_bytes, window_rss = [], []
    next_report = report_every
    started = time.perf_counter()
    for start in progress_bar(range(0, total - 1, chunk_size), progress, "stream", math.ceil((total - 1) / chunk_size)):
        chunk = ids[start : min(start + chunk_size, total - 1)]
        logits = model(chunk[None], **cache_kwargs(cache, model), use_cache=True).logits[0]
        nll[start : start + chunk.numel()] = token_nll(logits, ids[start + 1 : start + 1 + chunk.numel()]).cpu()
        held = cache_nbytes(cache)
        peak = max(peak, held)
        if start + chunk.numel() >= next_report:
            window_bytes.append(held)
            window_rss.append(current_rss_bytes())
            next_report += report_every
    seconds = time.perf_counter() - started
    windows = [nll[i : i + report_every] for i in range(0, nll.numel(), report_every)]
    if len(window_bytes) < len(windows):  # the last, partial window
        window_bytes.append(cache_nbytes(cache))
        window_rss.append(current_rss_bytes())
    return {
        "ppl": float(torch.exp(nll.mean())),
        "nll": float(nll.mean()),
        "tokens_scored": int(nll.numel()),
        "chunk_size": chunk_size,
        "exact": chunk_size == 1,
        "cache_bytes": cache_nbytes(cache),
        "cache_bytes_peak": peak,
        "window_ppl": [float(torch.exp(w.mean())) for w in windows if w.numel()],
        "window_cache_bytes": window_bytes,
        "window_rss_bytes": window_rss,
        "seconds": seconds,
        "tokens_per_second": nll.numel() / seconds if seconds > 0 else float("nan"),
    }


def window_starts(total: int, span: int, windows: int) -> list[int]:
    """Start offsets of ``windows`` consecutive spans of ``span`` tokens from the start of the text.

    Args:
        total (`int`): tokens in the text.
        span (`int`): tokens per window (context plus scored tokens).
        windows (`int`): how many windows; a text too short for them raises ``ValueError``.

    Example:

    ```python
    >>> window_starts(10_000, 2304, 3)
    [0, 2304, 4608]
    ```"""
    if not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows must be a positive integer, got {windows!r}")
    if span * windows > total:
        raise ValueError(f"{windows} windows of {span} tokens need {span * windows} tokens; the text has {total}")
    return [i * span for i in range(windows)]


@torch.no_grad()
def compression_perplexity(
    model,
    make_cache: Callable[[], object],
    token_ids,
    context_length: int = 2048,
    target_length: int = 256,
    windows: int = 3,
    prefill_chunk_size: int | None = None,
    decode_tokens: int = 0,
    progress: bool = False,
) -> dict:
    """Prefill ``context_length`` tokens through a fresh cache, then score ``target_length`` teacher-forced.

    Args:
        model: a causal LM.
        make_cache (`Callable[[], Cache]`): returns a fresh cache for each window.
        token_ids (`torch.LongTensor`): the text, ``[n]`` or ``[1, n]``.
        context_length (`int`, defaults to 2048): tokens prefilled through the cache.
        target_length (`int`, defaults to 256): tokens scored teacher-forced after the context.
        windows (`int`, defaults to 3): consecutive windows from the start of the text.
        prefill_chunk_size (`int`, *optional*): prefill in chunks of this many tokens (lets evicting
            caches stay at their budget during prefill).
        decode_tokens (`int`, defaults to 0): then greedy-decode this many tokens and time them.
        progress (`bool`, defaults to `False`): show a progress bar over the windows.

    Returns:
        `dict`: ``ppl`` (the mean of the windows' perplexities, as kvpress averages samples),
        ``ppl_tokens`` (exp of the mean NLL over all scored tokens), ``window_ppl``, ``cache_bytes`` (mean after prefill),
        ``cache_bytes_peak`` (most held after prefill, scoring or decoding), ``context_length``, ``target_length``,
        ``windows``, ``prefill_seconds``, ``decode_tokens_per_second`` (``None`` without ``decode_tokens``).

    Example:

    ```python
    >>> result = compression_perplexity(model, lambda: make_cache("sink", model, budget=1024), ids, windows=1)
    >>> result["ppl"], result["cache_bytes"] / 2**20
    ```
    """
    ids = flat_ids(token_ids)
    span = context_length + target_length
    nlls, window_ppl, held, prefill_seconds, peak = [], [], [], 0.0, 0
    for start in progress_bar(window_starts(ids.numel(), span, windows), progress, "windows", windows):
        window = ids[start : start + span].to(model.device)
        context, target = window[:context_length], window[context_length:]
        cache = make_cache()
        began = time.perf_counter()
        step = prefill_chunk_size or context_length
        for offset in range(0, context_length, step):
            logits = model(context[None, offset : offset + step], **cache_kwargs(cache, model), use_cache=True).logits
        prefill_seconds += time.perf_counter() - began
        held.append(cache_nbytes(cache))
        first = token_nll(logits[0, -1:], target[:1])
        rest = model(target[None, :-1], **cache_kwargs(cache, model), use_cache=True).logits[0]
        nll = torch.cat([first, token_nll(rest, target[1:])]).cpu()
        peak = max(peak, held[-1], cache_nbytes(cache))
        nlls.append(nll)
        window_ppl.append(float(torch.exp(nll.mean())))
    speed = None
    if decode_tokens > 0:
        token, began = rest[-1:].argmax(-1)[None], time.perf_counter()  # [1, 1]
        for _ in range(decode_tokens):
            token = model(token, **cache_kwargs(cache, model), use_cache=True).logits[:, -1:].argmax(-1)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        speed = decode_tokens / (time.perf_counter() - began)
        peak = max(peak, cache_nbytes(cache))
    nll = torch.cat(nlls)
    return {
        "ppl": sum(window_ppl) / len(window_ppl),
        "ppl_tokens": float(torch.exp(nll.mean())),
        "nll": float(nll.mean()),
        "window_ppl": window_ppl,
        "cache_bytes": int(sum(held) / len(held)),
        "cache_bytes_peak": peak,
        "context_length": context_length,
        "target_length": target_length,
        "windows": windows,
        "prefill_seconds": prefill_seconds,
        "decode_tokens_per_second": speed,
    }


@torch.no_grad()
def decode_speed(model, cache, prompt_ids, new_tokens: int = 64, prefill_chunk_size: int | None = None) -> dict:
    """Greedy-decode ``new_tokens`` after prefilling ``prompt_ids``; time the decode steps only.

    Args:
        model (`PreTrainedModel`): the model.
        cache (`transformers.Cache`): a fresh cache, filled by the prefill.
        prompt_ids (`torch.Tensor`): ``[1, prompt_len]`` token ids.
        new_tokens (`int`, *optional*, defaults to 64): greedy steps to time (at least 1).
        prefill_chunk_size (`int`, *optional*): prefill in chunks of this many tokens (``hf_kvplus.prefill``).

    Returns:
        `dict`: ``tokens_per_second``, ``step_seconds`` (median), ``cache_bytes``, ``peak_rss_bytes``,
        ``device_peak_bytes`` (CUDA only, else ``None``).

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("sink", model, budget=256)
    >>> decode_speed(model, cache, ids[None, :1024], new_tokens=16)["tokens_per_second"]
    ```
    """
    check_int("new_tokens", new_tokens)
    check_int("prefill_chunk_size", prefill_chunk_size, allow_none=True)
    ids = flat_ids(prompt_ids).to(model.device)[None]
    step = prefill_chunk_size or ids.shape[1]
    for offset in range(0, ids.shape[1], step):
        logits = model(ids[:, offset : offset + step], **cache_kwargs(cache, model), use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    times = []
    for _ in range(new_tokens):
        began = time.perf_counter()
        logits = model(token, **cache_kwargs(cache, model), use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        times.append(time.perf_counter() - began)
    times.sort()
    median = times[len(times) // 2]
    return {
        "tokens_per_second": len(times) / sum(times),
        "step_seconds": median,
        "cache_bytes": cache_nbytes(cache),
        "peak_rss_bytes": peak_rss_bytes(),
        "device_peak_bytes": device_peak_bytes(model.device),
    }


__all__ = ["MIB", "compression_perplexity", "decode_speed", "flat_ids", "progress_bar", "streaming_perplexity", "token_nll",
           "window_starts"]
