"""Why prompt order matters: a simulated agent loop through a :class:`~hf_kvplus.PrefixStore`, two orderings.

Every turn's prompt is a long stable part (system prompt and tool list), the conversation so far (each
turn appends a short user message and a tool result) and one variable line, a timestamp. A prefix cache
reuses the longest cached *prefix*, so where the variable line goes decides everything:

* ``stable_first``: the timestamp sits in the newest user message, at the end; every turn reuses the
  whole previous prompt (whole blocks) and prefills only what is new;
* ``variable_first``: the timestamp heads the prompt; it changes every turn, so no prefix ever matches and
  every turn prefills the whole, growing prompt.

Segments are tokenized one by one and concatenated, so a turn's prompt extends the previous one token for
token (as a chat template does), and reuse depends only on the ordering.
"""

from __future__ import annotations

import time

import torch

from .._compat import cache_kwargs
from ..prefix import PrefixStore
from ..validate import check_int

ORDERINGS = ("stable_first", "variable_first")
SYSTEM = (
    "You are Atlas, an operations assistant for a small web shop. You answer the on-call engineer in short, "
    "precise sentences. You may call tools; each call returns JSON that you must read before answering. Never "
    "invent numbers: quote the tool results. When a tool fails, say so and suggest the next check. Keep secrets "
    "out of answers. Prefer read-only tools; ask before restarting anything.\n\n"
)
TOOLS = [
    ("get_orders", "List orders placed in a time range.", "start: ISO time, end: ISO time, status: open|paid|shipped"),
    ("get_metrics", "Read a service metric.", "service: name, metric: latency_p99|error_rate|rps, minutes: int"),
    ("search_logs", "Search service logs.", "service: name, query: text, limit: int (default 20)"),
    ("get_inventory", "Stock level of a product.", "sku: product code"),
    ("list_deploys", "Recent deployments.", "service: name, limit: int"),
    ("get_alerts", "Alerts currently firing.", "severity: page|ticket|all"),
    ("restart_service", "Restart a service (asks for confirmation).", "service: name, reason: text"),
    ("page_human", "Page the human on call.", "message: text, urgency: high|low"),
]
QUESTIONS = [
    ("Are any alerts firing right now?", "get_alerts", '{"firing": [{"name": "checkout-latency", "severity": "page", '
     '"since": "08:52"}]}'),
    ("What is the p99 latency of checkout over the last 30 minutes?", "get_metrics", '{"service": "checkout", '
     '"latency_p99_ms": [412, 455, 1290, 1875, 1930, 1744], "unit": "ms", "step_minutes": 5}'),
    ("Was anything deployed to checkout today?", "list_deploys", '{"deploys": [{"id": "d-4471", "at": "08:47", '
     '"author": "mira", "change": "new tax rounding"}]}'),
    ("Any errors in the checkout logs since then?", "search_logs", '{"matches": 37, "top": "TimeoutError: tax-service '
     'did not answer in 1500 ms", "first": "08:49"}'),
    ("How are the tax-service metrics?", "get_metrics", '{"service": "tax-service", "latency_p99_ms": [95, 101, 1460, '
     '1502, 1499, 1511], "error_rate": 0.08}'),
    ("How many orders are stuck open since 08:45?", "get_orders", '{"count": 212, "status": "open", "oldest": '
     '"08:46", "value_eur": 18342.5}'),
    ("Is SKU TEA-042 still in stock?", "get_inventory", '{"sku": "TEA-042", "available": 14, "reserved": 31}'),
    ("Page Mira about the tax rounding deploy, high urgency.", "page_human", '{"paged": "mira", "ack": false}'),
]


def _clock(turn: int) -> str:
    seconds = 9 * 3600 + 2 * 60 + turn * 97 + (turn * 13) % 7  # a few minutes between turns, every turn differs
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def agent_segments(turns: int = 8, ordering: str = "stable_first") -> list[list[str]]:
    """The text segments of every turn's prompt: ``[[segment, ...] for each turn]``.

    Args:
        turns (`int`, defaults to 8): turns of the loop (at most ``len(QUESTIONS)`` distinct ones, then repeated).
        ordering (`str`, defaults to ``"stable_first"``): ``"stable_first"`` or ``"variable_first"``.
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {list(ORDERINGS)}, got {ordering!r}")
    check_int("turns", turns)
    tools = "Tools:\n" + "".join(f"- {name}: {what} Arguments: {args}.\n" for name, what, args in TOOLS) + "\n"
    history, prompts = [], []
    for turn in range(1, turns + 1):
        question, tool, result = QUESTIONS[(turn - 1) % len(QUESTIONS)]
        now = _clock(turn)
        user = f"User: {question}" + (f" (sent at {now})" if ordering == "stable_first" else "") + "\n"
        history += [user, f"Tool {tool} returned: {result}\n"]
        if ordering == "stable_first":
            prompts.append([SYSTEM, tools, *history, "Assistant:"])
        else:
            prompts.append([f"Time {now}. Current session state follows.\n", SYSTEM, tools, *history, "Assistant:"])
    return prompts


def _encode(tokenizer, segments: list[str]) -> torch.Tensor:
    ids = [i for text in segments for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return torch.tensor([ids], dtype=torch.long)  # [1, prompt tokens]


@torch.no_grad()
def prompt_order(model, tokenizer, turns: int = 8, orderings=ORDERINGS, block_size: int = 16,
                 progress: bool = False) -> list[dict]:
    """Run the agent loop once per ordering, each through a fresh :class:`PrefixStore`; one row per turn.

    Each turn looks up the longest cached prefix (``store.cache_for``), prefills the rest and computes the
    first token (``generate`` with ``max_new_tokens=1``): the time to first token.

    Args:
        model (`PreTrainedModel`): the model.
        tokenizer: its tokenizer (segments are tokenized one at a time).
        turns (`int`, *optional*, defaults to 8): turns of the loop after the system prompt.
        orderings (*optional*): the orderings to compare, by default ``ORDERINGS`` (stable content
            first, and a variable line first).
        block_size (`int`, *optional*, defaults to 16): the ``PrefixStore`` block size.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `list[dict]`: ``ordering``, ``turn``, ``prompt_tokens``, ``reused_tokens``, ``prefill_tokens``
        (computed), ``ttft_s``, ``store_mib``.

    Example:

    ```python
    >>> rows = prompt_order(model, tokenizer, turns=4)
    >>> [(r["ordering"], r["turn"], r["reused_tokens"]) for r in rows]
    ```
    """
    rows = []
    for ordering in orderings:
        store = PrefixStore(max_bytes=None, block_size=block_size)
        for turn, segments in enumerate(agent_segments(turns, ordering), 1):
            ids = _encode(tokenizer, segments).to(model.device)
            started = time.perf_counter()
            cache = store.cache_for(model, ids)
            reused = cache.get_seq_length()
            model.generate(ids, **cache_kwargs(cache), max_new_tokens=1, do_sample=False,
                           pad_token_id=model.generation_config.pad_token_id or 0)
            ttft = time.perf_counter() - started
            cache.release()
            rows.append({"ordering": ordering, "turn": turn, "prompt_tokens": ids.shape[1], "reused_tokens": reused,
                         "prefill_tokens": ids.shape[1] - reused, "ttft_s": ttft, "store_mib": store.nbytes / 2**20})
            if progress:
                print(f"  {ordering} turn {turn}: {ids.shape[1]} tokens, reused {reused}, {ttft:.2f} s", flush=True)
    return rows
