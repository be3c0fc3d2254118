"""A chat whose every turn reuses the previous turns through a PrefixStore (a prompt cache).

Each turn's prompt is the whole conversation so far (the chat template of the system prompt, the
questions and the answers). ``store.cache_for`` hands ``generate`` a cache that already holds the
longest cached prefix of it, so only the new user message (and the last partial block) is
prefilled. Nothing is called to "save" a turn: the cache publishes what it computes, answers
included, as it goes.

    PYTHONPATH=. python examples/chat_prefix_cache.py
"""

from __future__ import annotations

import time

import torch

import hf_kvplus
from hf_kvplus.eval import load_default_model, load_default_tokenizer

SYSTEM = (
    "You are a patient Python tutor. Answer in two or three sentences, with plain words, and show code only "
    "when it is shorter than the explanation. Prefer the standard library. When a question is ambiguous, "
    "answer the most common reading and say which one you chose."
)
QUESTIONS = [
    "What does the with statement do?",
    "How do I write my own context manager?",
    "Can a generator be one?",
    "Which module helps with that?",
]


@torch.no_grad()
def chat(model, tokenizer, store, questions=QUESTIONS, max_new_tokens=40) -> list[dict]:
    """Run the conversation; returns one row per turn (prompt tokens, tokens reused, seconds, answer)."""
    messages, rows = [{"role": "system", "content": SYSTEM}], []
    for turn, question in enumerate(questions, 1):
        messages.append({"role": "user", "content": question})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]  # [1, prompt tokens]
        began = time.perf_counter()
        cache = store.cache_for(model, ids)
        reused = cache.get_seq_length()
        out = model.generate(ids, cache=cache, max_new_tokens=max_new_tokens, do_sample=False)  # past_key_values= before transformers 5.24
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        rows.append({"turn": turn, "prompt_tokens": ids.shape[1], "reused": reused,
                     "prefilled": ids.shape[1] - reused, "seconds": time.perf_counter() - began, "answer": answer})
    return rows


def main() -> None:
    model, tokenizer = load_default_model(), load_default_tokenizer()
    store = hf_kvplus.PrefixStore(max_bytes=256 * 2**20)
    for row in chat(model, tokenizer, store):
        print(f"turn {row['turn']}: prompt {row['prompt_tokens']} tokens, reused {row['reused']} from the store, "
              f"prefilled {row['prefilled']}\n  {row['answer'][:90]!r}")
    stats = store.stats()
    print(f"store: {stats['tokens_held']} tokens held in {stats['bytes_held'] / 2**20:.1f} MiB, "
          f"{stats['hits']} hits, {stats['misses']} miss, {stats['tokens_reused']} tokens reused")


if __name__ == "__main__":
    main()
