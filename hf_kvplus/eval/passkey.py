"""Passkey retrieval: can the model still find a fact after the cache has evicted or compressed the text?

A 5-digit pass key is hidden at a given depth of ``context_length`` tokens of text, followed by a question.
The prompt goes through the cache, then the model answers greedily through that cache (as many tokens as
the key takes, plus :data:`SLACK`); the answer is the first run of digits in that text (the whole text when
it has none), scored against the key with exact match (the ``evaluate`` metric shipped in
``hf_kvplus/eval/metrics/exact_match``). The perplexity of the key's tokens, teacher-forced, is measured on
a copy of the cache taken after the prompt, so both see the same cache.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from .._compat import cache_kwargs
from ..memory import cache_nbytes
from .perplexity import flat_ids, progress_bar, token_nll

METRICS = Path(__file__).resolve().parent / "metrics"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
SLACK = 2  # greedy tokens beyond the key's own, so an answer may open with a space or a word


def extract_answer(text: str) -> str:
    """The first run of digits in ``text`` (the model's greedy answer), else ``text`` stripped.

    Example:

    ```python
    >>> extract_answer(" 46044.\\n"), extract_answer(" a special syntax")
    ('46044', 'a special syntax')
    ```"""
    found = re.search(r"\d+", text)
    return found.group(0) if found else text.strip()


def _greedy(model, cache, logits: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens through ``cache``, starting from the prompt's last ``logits`` ``[vocab]``."""
    tokens = [logits.argmax(-1)]  # each [] on the model's device
    for _ in range(steps - 1):
        step = model(tokens[-1].reshape(1, 1), **cache_kwargs(cache, model), use_cache=True).logits[0, -1]
        tokens.append(step.argmax(-1))
    return torch.stack(tokens)  # [steps]


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
        `dict`: ``exact_match`` (share of greedy answers whose first number is the key), ``ppl`` (of the key's
        tokens, teacher-forced), ``cache_bytes`` (mean after the prompt), ``cache_bytes_peak`` (largest during the
        answers), ``tokens_scored``, ``predictions`` (the numbers extracted), ``references`` (the keys) and
        ``answers`` (the greedy texts).

    Example:

    ```python
    >>> passkey_retrieval(model, tokenizer, ids, lambda: make_cache("sink", model, budget=256))["exact_match"]
    ```
    """
    ids = flat_ids(token_ids)
    generator = torch.Generator().manual_seed(seed)
    question = _encode(tokenizer, QUESTION)
    cases = [(d, s) for d in depths for s in range(samples)]
    predictions, references, texts, nlls, held, peak = [], [], [], [], [], 0
    for depth, sample in progress_bar(cases, progress, "passkey", len(cases)):
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
        logits = model(prompt[None], **cache_kwargs(cache, model), use_cache=True).logits[0, -1:]  # [1, vocab]
        held.append(cache_nbytes(cache))
        answer = answer.to(model.device)
        forced = copy.deepcopy(cache)  # the same cache after the prompt, for the teacher-forced perplexity
        rest = model(answer[None, :-1], **cache_kwargs(forced, model), use_cache=True).logits[0]
        nlls.append(token_nll(torch.cat([logits, rest]), answer).cpu())  # [answer_len, vocab] predict the answer
        del forced
        greedy = _greedy(model, cache, logits[0], answer.numel() + SLACK)
        peak = max(peak, held[-1], cache_nbytes(cache))
        texts.append(tokenizer.decode(greedy))
        predictions.append(extract_answer(texts[-1]))
        references.append(key)
    score = load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]
    nll = torch.cat(nlls)
    return {"exact_match": score, "ppl": float(torch.exp(nll.mean())), "cache_bytes": int(sum(held) / len(held)),
            "cache_bytes_peak": peak, "tokens_scored": int(nll.numel()), "predictions": predictions,
            "references": references, "answers": texts}
