"""Passkey retrieval: can the model still find a fact after the cache has evicted or compressed the text?

A 5-digit pass key is hidden at a given depth of ``context_length`` tokens of text, followed by a question.
The prompt goes through the cache; the answer tokens are then scored teacher-forced in one forward.
Greedy decoding returns the key exactly if and only if every teacher-forced argmax equals the key's
token, so one forward gives both the exact match (scored with the ``evaluate`` metric shipped in
``hf_kvplus/eval/metrics/exact_match``) and the perplexity of the answer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._compat import cache_kwargs
from ..memory import cache_nbytes
from .perplexity import _flat_ids, _nll, _progress

METRICS = Path(__file__).resolve().parent / "metrics"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def load_metric(name: str = "exact_match"):
    """An ``evaluate`` metric shipped in the package, loaded from its folder (works offline).

    Args:
        name (`str`, *optional*, defaults to ``"exact_match"``): a folder under ``hf_kvplus/eval/metrics``.

    Example:

    ```python
    >>> load_metric("exact_match").compute(predictions=["71432"], references=["71432"])
    {'exact_match': 1.0}
    ```
    """
    import evaluate

    folder = METRICS / name
    if not folder.is_dir():
        raise ValueError(f"unknown metric {name!r}; shipped: {sorted(p.name for p in METRICS.iterdir() if p.is_dir())}")
    return evaluate.load(str(folder))


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def passkey_retrieval(model, tokenizer, token_ids, make_cache, context_length: int = 1024, depths=(0.1, 0.5, 0.9),
                      samples: int = 2, seed: int = 0, progress: bool = False) -> dict:
    """Hide a pass key at each depth of ``samples`` text windows and ask for it back through the cache.

    Args:
        model: a causal LM. tokenizer: its tokenizer.
        token_ids (`torch.LongTensor`): the haystack text, ``[n]``.
        make_cache (`Callable[[], Cache]`): a fresh cache per prompt.
        context_length (`int`, defaults to 1024): prompt tokens (text + key + question).
        depths (`list[float]`, defaults to ``[0.1, 0.5, 0.9]``): where the key sits (0 = start, 1 = end).
        samples (`int`, defaults to 2): windows of text per depth.
        seed (`int`, defaults to 0): seeds the keys.

    Returns:
        `dict`: ``exact_match``, ``ppl`` (of the answer tokens), ``cache_bytes`` (mean after the prompt),
        ``cache_bytes_peak``, ``tokens_scored``, ``predictions``, ``references``.

    Example:

    ```python
    >>> passkey_retrieval(model, tokenizer, ids, lambda: make_cache("sink", model, budget=256))["exact_match"]
    ```
    """
    ids = _flat_ids(token_ids)
    generator = torch.Generator().manual_seed(seed)
    question = _encode(tokenizer, QUESTION)
    cases = [(d, s) for d in depths for s in range(samples)]
    predictions, references, nlls, held, peak = [], [], [], [], 0
    for depth, sample in _progress(cases, progress, "passkey", len(cases)):
        key = str(int(torch.randint(10_000, 100_000, (1,), generator=generator)))
        needle, answer = _encode(tokenizer, NEEDLE.format(key=key)), _encode(tokenizer, " " + key)
        filler = context_length - needle.numel() - question.numel()
        start = sample * filler
        if filler < 1 or start + filler > ids.numel():
            raise ValueError(f"passkey needs context_length > {needle.numel() + question.numel()} and "
                             f"{samples} x {max(filler, 1)} tokens of text; the text has {ids.numel()}")
        text = ids[start : start + filler]
        cut = int(depth * filler)
        prompt = torch.cat([text[:cut], needle, text[cut:], question]).to(model.device)  # [context_length]
        cache = make_cache()
        logits = model(prompt[None], **cache_kwargs(cache, model), use_cache=True).logits[0, -1:]
        held.append(cache_nbytes(cache))
        answer = answer.to(model.device)
        rest = model(answer[None, :-1], **cache_kwargs(cache, model), use_cache=True).logits[0]
        logits = torch.cat([logits, rest])  # [answer_len, vocab]: each predicts the next answer token
        peak = max(peak, held[-1], cache_nbytes(cache))
        nlls.append(_nll(logits, answer).cpu())
        predictions.append(tokenizer.decode(logits.argmax(-1)).strip())
        references.append(key)
    score = load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]
    nll = torch.cat(nlls)
    return {"exact_match": score, "ppl": float(torch.exp(nll.mean())), "cache_bytes": int(sum(held) / len(held)),
            "cache_bytes_peak": peak, "tokens_scored": int(nll.numel()), "predictions": predictions,
            "references": references}
