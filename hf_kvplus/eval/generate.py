"""Try one cache on one prompt: the text it generates, the bytes it holds, and how fast (``kvplus generate``).

:func:`generate_with_cache` runs ``model.generate`` greedily with a fresh cache of one strategy and times it
through a streamer (transformers' public ``BaseStreamer``): the first call carries the prompt, the second
the first new token (time to first token), the rest the decode steps. With ``compare=True`` the same input
also runs through ``DynamicCache``, so the two rows sit side by side.
"""

from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer

from .._compat import cache_kwargs
from ..hooks import detach
from ..memory import cache_nbytes, peak_memory, reset_peak_memory
from ..registry import make_cache, resolve
from .perplexity import MIB

DEFAULT_PROMPT = "Explain in three sentences what a key-value cache does in a transformer language model."


class _Clock(BaseStreamer):
    """Time stamps of every ``put`` after the prompt's (one per generated token, batch 1)."""

    def __init__(self):
        self.prompt_seen, self.stamps = False, []

    def put(self, value):
        if not self.prompt_seen:  # generate streams the prompt first
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def build_cache(model, strategy: str, budget: int | None = None, nbits: int | None = None):
    """A fresh cache of ``strategy`` for ``model``.

    Args:
        model (`PreTrainedModel`): the model.
        strategy (`str`): a registered strategy or preset, or ``"dynamic"``.
        budget (`int`, *optional*): tokens kept per layer by an evicting strategy (required by those).
        nbits (`int`, *optional*): 8, 4 or 2 for packed storage.

    Raises:
        ValueError: an evicting strategy without ``budget``; from :func:`hf_kvplus.make_cache`: an unknown name,
            a setting the strategy does not take.
    """
    kwargs = {k: v for k, v in (("budget", budget), ("nbits", nbits)) if v is not None}
    if budget is None and resolve(strategy)[0].evicting:
        raise ValueError(f"{strategy!r} evicts tokens: give it a budget (tokens kept per layer, e.g. --budget 256)")
    return make_cache(strategy, model, **kwargs)


@torch.no_grad()
def generate_with_cache(model, tokenizer, prompt: str = DEFAULT_PROMPT, strategy: str = "sink",
                        budget: int | None = None, nbits: int | None = None, max_new_tokens: int = 64,
                        compare: bool = False, chat: bool = True) -> list[dict]:
    """Generate greedily with a fresh cache of ``strategy``; measure what it holds and how fast it goes.

    Args:
        model (`PreTrainedModel`): a causal LM, already on its device.
        tokenizer: its tokenizer.
        prompt (`str`, *optional*): the user message (wrapped in the chat template when the tokenizer has one
            and ``chat`` is true).
        strategy (`str`, *optional*, defaults to ``"sink"``): a registered strategy or preset.
        budget (`int`, *optional*): tokens per layer for evicting strategies (default: the strategy's own rule:
            :func:`hf_kvplus.make_cache` says when one is required).
        nbits (`int`, *optional*): 8, 4 or 2 for packed storage.
        max_new_tokens (`int`, *optional*, defaults to 64): tokens to generate (greedy).
        compare (`bool`, *optional*, defaults to `False`): also run ``dynamic`` (``DynamicCache``) on the same input.
        chat (`bool`, *optional*, defaults to `True`): apply the tokenizer's chat template when it has one.

    Returns:
        `list[dict]`: one row per cache run: ``strategy``, ``settings``, ``text`` (the generated text),
        ``new_tokens``, ``prompt_tokens``, ``cache_bytes`` and ``cache_mib`` (:func:`hf_kvplus.cache_nbytes`
        after generation), ``ttft_s`` (time to the first new token: prefill plus one step), ``decode_tok_s``
        (the remaining tokens per second, ``None`` with fewer than 2 new tokens), ``peak_gpu_mib`` (CUDA
        ``max_memory_allocated``, model included; ``None`` off CUDA) and ``peak_rss_mib`` (the process's peak RSS).

    Example:

    ```python
    >>> rows = generate_with_cache(model, tokenizer, "Why is the sky blue?", "sink", budget=64, compare=True)
    >>> [(r["strategy"], round(r["cache_mib"], 1)) for r in rows]
    ```"""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)  # [1, n]
    build_cache(model, strategy, budget, nbits)  # bad names and settings fail before anything runs
    detach(model)
    runs = [(strategy, budget, nbits)] + ([("dynamic", None, None)] if compare and strategy != "dynamic" else [])
    return [_run(model, tokenizer, input_ids, *run, max_new_tokens) for run in runs]


def _run(model, tokenizer, input_ids, strategy, budget, nbits, max_new_tokens) -> dict:
    cache = build_cache(model, strategy, budget, nbits)
    clock = _Clock()
    reset_peak_memory(model.device)
    began = time.perf_counter()
    try:
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **cache_kwargs(cache),
                             max_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    finally:
        detach(model)  # the next run starts from the plain model (SDPA, no hook)
    peaks = peak_memory(model.device)
    new = out[0, input_ids.shape[1]:]  # [new_tokens]
    stamps = clock.stamps
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    held = cache_nbytes(cache)
    settings = ", ".join(f"{k}={v}" for k, v in (("budget", budget), ("nbits", nbits)) if v is not None)
    return {"strategy": strategy, "settings": settings or "defaults", "text": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel()), "prompt_tokens": int(input_ids.shape[1]), "cache_bytes": held,
            "cache_mib": held / MIB, "ttft_s": (stamps[0] - began) if stamps else None, "decode_tok_s": decode,
            "peak_gpu_mib": None if peaks["device_peak_bytes"] is None else peaks["device_peak_bytes"] / MIB,
            "peak_rss_mib": peaks["peak_rss_bytes"] / MIB}


def format_generation(rows: list[dict]) -> str:
    """The rows of :func:`generate_with_cache` as text: each generation, then one line of measurements per cache.

    Example:

    ```python
    >>> print(format_generation(generate_with_cache(model, tokenizer, strategy="int4", compare=True)))
    ```"""
    lines = []
    for row in rows:
        lines += [f"--- {row['strategy']} ({row['settings']}): {row['new_tokens']} new tokens after a "
                  f"{row['prompt_tokens']}-token prompt", row["text"].strip(), ""]
    for row in rows:
        speed = "n/a" if row["decode_tok_s"] is None else f"{row['decode_tok_s']:.1f} tokens/s"
        ttft = "n/a" if row["ttft_s"] is None else f"{row['ttft_s']:.3f} s"
        memory = (f"peak GPU memory {row['peak_gpu_mib']:,.0f} MiB" if row["peak_gpu_mib"] is not None
                  else f"peak RSS {row['peak_rss_mib']:,.0f} MiB")
        lines.append(f"{row['strategy']:>10}: cache holds {row['cache_mib']:.2f} MiB ({row['cache_bytes']:,} bytes), "
                     f"time to first token {ttft}, decode {speed}, {memory}")
    if len(rows) == 2 and rows[1]["cache_bytes"]:
        same = "the same text" if rows[0]["text"] == rows[1]["text"] else "a different text"
        lines.append(f"{rows[0]['strategy']} holds {rows[0]['cache_bytes'] / rows[1]['cache_bytes']:.3f}x the bytes of "
                     f"{rows[1]['strategy']} and generated {same}")
    return "\n".join(lines)
