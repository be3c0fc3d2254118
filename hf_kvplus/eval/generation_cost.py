"""The cost of not caching: generate N tokens with ``use_cache=False``, with ``DynamicCache`` and with our caches.

Without a cache every new token re-runs the whole sequence, so step ``i`` costs as much as a prefill of
``P + i - 1`` tokens and N tokens cost O(N^2) (attention alone O(N^3)); with a cache each step runs one
token, O(N) in total. Work is estimated from the config (:func:`forward_flops`), time is measured with
``time.perf_counter`` at every step of one ``model.generate`` call per method.

FLOPs counted (a multiply-add is 2 FLOPs), per decoder layer and token at position ``c`` (it attends to
``c`` keys, causal): projections ``2 h (q d) + 4 h (kv d) + 2 (q d) h``, MLP ``2 m h I`` (``m`` = 3
matrices for gated MLPs such as Llama's, 2 otherwise), attention ``4 q d c`` (scores and weighted sum);
plus the LM head ``2 h V`` for the one position whose logits ``generate`` computes per forward (an evicting
cache attends to its budget only). Norms, RoPE, softmax and embeddings are ignored.
"""

from __future__ import annotations

import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .._compat import cache_kwargs
from ..config import text_config

UNGATED_MLP = ("gpt_neox", "gpt2", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode")
NO_CACHE = "no cache"


def flop_terms(config) -> dict:
    """``linear`` (FLOPs per token and layer outside attention), ``attention`` (per token, layer and key), ``head``."""
    config = text_config(config)
    h, layers, q = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or q
    d = getattr(config, "head_dim", None) or h // q
    inner = getattr(config, "intermediate_size", None) or 4 * h
    matrices = 2 if config.model_type in UNGATED_MLP else 3
    linear = 2 * h * q * d + 4 * h * kv * d + 2 * q * d * h + 2 * matrices * h * inner
    return {"layers": layers, "linear": linear, "attention": 4 * q * d, "head": 2 * h * config.vocab_size}


def forward_flops(config, new_tokens: int, context_before: int = 0) -> int:
    """FLOPs of one forward over ``new_tokens`` tokens after ``context_before`` cached ones (logits of the last only).

    Args:
        config (`PreTrainedConfig`): the model's config (layers, hidden and MLP sizes, heads, vocabulary).
        new_tokens (`int`): tokens computed in this forward.
        context_before (`int`, *optional*, defaults to 0): tokens already cached that they attend to.

    Example:

    ```python
    >>> forward_flops(model.config, 1, 1023)  # one decoding step at position 1024
    ```
    """
    t = flop_terms(config)
    first, last = context_before + 1, context_before + new_tokens  # keys seen by the first and last new token
    keys = (first + last) * new_tokens // 2
    return t["layers"] * (t["linear"] * new_tokens + t["attention"] * keys) + t["head"]


def generation_flops(config, prompt_length: int, new_tokens: int, use_cache: bool, budget: int | None = None) -> int:
    """Estimated FLOPs to generate ``new_tokens`` after a ``prompt_length`` prompt, with or without a cache.

    Args:
        config (`PreTrainedConfig`): the model's config.
        prompt_length (`int`): tokens of the prompt.
        new_tokens (`int`): tokens generated.
        use_cache (`bool`): ``False`` recomputes the whole sequence at every step (quadratic work).
        budget (`int`, *optional*): a cache that keeps at most that many tokens, so each decoding step
            attends to ``budget + 1`` keys.

    Example:

    ```python
    >>> generation_flops(model.config, 32, 1024, use_cache=False) / generation_flops(model.config, 32, 1024, use_cache=True)
    ```
    """
    if use_cache:
        held = (lambda n: n) if budget is None else (lambda n: min(n, budget))
        return forward_flops(config, prompt_length) + sum(
            forward_flops(config, 1, held(prompt_length + i - 1)) for i in range(1, new_tokens))
    return sum(forward_flops(config, prompt_length + i) for i in range(new_tokens))


class _StepClock(StoppingCriteria):
    """Records ``time.perf_counter()`` after every generated token (never stops generation)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def time_generation(model, prompt: torch.Tensor, new_tokens: int, cache=None, use_cache: bool = True) -> list[float]:
    """Seconds from the call to each generated token (``len == new_tokens``), greedy, EOS never stops it."""
    clock = _StepClock()
    kwargs = cache_kwargs(cache) if cache is not None else {}
    started = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                   stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=model.generation_config.pad_token_id
                   or 0, **kwargs)
    return [t - started for t in clock.times]


def generation_cost(model, prompt: torch.Tensor, methods: dict, new_tokens=(64, 128, 256, 512, 1024),
                    no_cache_max_new_tokens: int = 128, progress: bool = False) -> list[dict]:
    """Generate with every method and report time and estimated FLOPs at each length in ``new_tokens``.

    Args:
        model: a causal LM. prompt (`torch.LongTensor`): ``[1, P]`` prompt ids.
        methods (`dict`): label -> ``None`` (``use_cache=False``) or a zero-argument cache factory.
        new_tokens (`list[int]`, defaults to 64 ... 1024): lengths reported (one generate call per method up to the largest).
        no_cache_max_new_tokens (`int`, defaults to 128): ``use_cache=False`` is measured only up to here (its cost
            grows quadratically; beyond the cap its FLOPs are still estimated, its time is not measured).

    Returns:
        `list[dict]`: one row per method and length: ``method``, ``new_tokens``, ``seconds`` (to the N-th token,
        prefill included; ``None`` beyond the cap), ``tokens_per_s``, ``last_step_ms``, ``gflops`` (estimated),
        ``gflops_per_token``, ``measured``.

    Example:

    ```python
    >>> rows = generation_cost(model, prompt, {"no cache": None, "dynamic": lambda: make_cache("dynamic", model)})
    ```
    """
    lengths = sorted({int(n) for n in new_tokens})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"new_tokens must be integers >= 1, got {list(new_tokens)}")
    rows, prompt_length = [], prompt.shape[-1]
    for label, factory in methods.items():
        use_cache = factory is not None
        measured = lengths[-1] if use_cache else max([n for n in lengths if n <= no_cache_max_new_tokens], default=0)
        if progress:
            print(f"  {label}: generating {measured} tokens", flush=True)
        cache = factory() if use_cache else None
        budget = getattr(cache, "budget", None)  # an evicting cache attends to its budget only
        times = time_generation(model, prompt, measured, cache, use_cache) if measured else []
        for n in lengths:
            flops = generation_flops(model.config, prompt_length, n, use_cache, budget)
            seconds = times[n - 1] if n <= len(times) else None
            last = (times[n - 1] - times[n - 2]) * 1e3 if seconds is not None and n >= 2 else None
            rows.append({"method": label, "new_tokens": n, "prompt_tokens": prompt_length, "use_cache": use_cache,
                         "measured": seconds is not None, "seconds": seconds,
                         "tokens_per_s": n / seconds if seconds else None, "last_step_ms": last,
                         "gflops": flops / 1e9, "gflops_per_token": flops / 1e9 / n})
    return rows
