"""Protocols a recipe can run: each turns (model, tokens, a cache factory, options) into one row of metrics.

* ``compression``: prefill ``context_length`` tokens, score the next ``target_length`` teacher-forced
  (kvpress protocol), then time ``decode_tokens`` greedy steps;
* ``streaming``: feed ``num_tokens`` tokens through one cache and score every next token (StreamingLLM
  protocol); ``chunk_size`` 1 is exact, more is a faster approximation and is reported as such;
* ``passkey``: hide a pass key in the text and ask for it back, scored with exact match
  (see :mod:`hf_kvplus.eval.passkey`).

Every row has ``ppl``, ``cache_bytes`` and ``cache_bytes_peak``; :mod:`.runner` adds process memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..validate import check_int, check_ratio
from .perplexity import compression_perplexity, streaming_perplexity


def _positive(name: str, value, where: str, allow_none: bool = False):
    return check_int(name, value, allow_none=allow_none, where=where)


def _ratios(name: str, value, where: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    for item in values:
        check_ratio(name, item, where=where)
    return [float(v) for v in values]


@dataclass(frozen=True)
class Protocol:
    """A named protocol: default options, how to check them, and the function that runs one grid point.

    ``keep_ratio_base`` names the option a ``keep_ratio`` multiplies to give a budget (``None``: the
    protocol has no fixed context, so grids give ``budget`` directly).
    """

    name: str
    defaults: dict
    run: Callable[..., dict]
    keep_ratio_base: str | None = None
    non_negative: tuple = ()
    lists: tuple = ()

    def parse_options(self, raw: dict, where: str) -> dict:
        """Defaults overridden by ``raw``; unknown options and bad values raise ``ValueError``."""
        if not isinstance(raw, dict):
            raise TypeError(f"{where} must be a mapping of options, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for protocol {self.name!r}; allowed: {sorted(self.defaults)}")
        options = {**self.defaults, **raw}
        for key, value in options.items():
            if key in self.lists:
                options[key] = _ratios(key, value, where)
            elif key in self.non_negative:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"bad value {value!r} for {where}.{key}: allowed values are integers >= 0")
            else:
                _positive(key, value, where, allow_none=self.defaults[key] is None)
        return options


def _compression(model, tokenizer, ids, make_cache, options: dict, progress: bool = False) -> dict:
    result = compression_perplexity(
        model, make_cache, ids, context_length=options["context_length"], target_length=options["target_length"],
        windows=options["windows"], prefill_chunk_size=options["prefill_chunk_size"],
        decode_tokens=options["decode_tokens"], progress=progress,
    )
    return {"ppl": result["ppl"], "ppl_tokens": result["ppl_tokens"], "cache_bytes": result["cache_bytes"],
            "cache_bytes_peak": result["cache_bytes_peak"], "decode_tok_s": result["decode_tokens_per_second"],
            "tokens_scored": options["target_length"] * options["windows"], "window_ppl": result["window_ppl"]}


def _streaming(model, tokenizer, ids, make_cache, options: dict, progress: bool = False) -> dict:
    result = streaming_perplexity(
        model, make_cache(), ids, num_tokens=options["num_tokens"], chunk_size=options["chunk_size"],
        report_every=options["report_every"], progress=progress,
    )
    return {"ppl": result["ppl"], "cache_bytes": result["cache_bytes"], "cache_bytes_peak": result["cache_bytes_peak"],
            "decode_tok_s": result["tokens_per_second"] if result["exact"] else None,
            "tokens_scored": result["tokens_scored"], "chunk_size": result["chunk_size"], "exact": result["exact"],
            "window_ppl": result["window_ppl"], "window_cache_bytes": result["window_cache_bytes"]}


def _passkey(model, tokenizer, ids, make_cache, options: dict, progress: bool = False) -> dict:
    from .passkey import passkey_retrieval

    return passkey_retrieval(model, tokenizer, ids, make_cache, **options, progress=progress)


PROTOCOLS: dict[str, Protocol] = {
    "compression": Protocol(
        "compression",
        {"context_length": 2048, "target_length": 256, "windows": 1, "prefill_chunk_size": None, "decode_tokens": 16},
        _compression, keep_ratio_base="context_length", non_negative=("decode_tokens",),
    ),
    "streaming": Protocol(
        "streaming", {"num_tokens": 4096, "chunk_size": 1, "report_every": 512}, _streaming,
    ),
    "passkey": Protocol(
        "passkey", {"context_length": 1024, "depths": [0.1, 0.5, 0.9], "samples": 2, "seed": 0},
        _passkey, keep_ratio_base="context_length", non_negative=("seed",), lists=("depths",),
    ),
}
