"""Which quantization choices matter at int2: a screening with simulated quantization.

Each variant stores tokens in full precision but replaces them by their quantize-dequantize round
trip at the moment ``QuantizedStore`` would quantize them (when the residual overflows, by whole
groups), and returns the current forward's tokens exactly, as ``QuantizedStore`` does: perplexity
is the one the packed store would give (the ``int2`` row reproduces ``benchmarks/quantized.py``),
without writing the packed kernels for each variant. Variants: which tensor is quantized, full
precision attention sinks, per-token keys, keys quantized before RoPE (KVQuant), group and
residual sizes, Hadamard-rotated keys (QuaRot arXiv:2404.00456, RotateKV arXiv:2501.16383), keys at 4 bits.
Same protocol as ``benchmarks/quantized.py`` (2048 + 256 tokens, 3 windows, the one-forward ``ppl``).
``--only LABEL ...`` measures some variants and merges them into the saved report.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/quantized_ablation.py  # about 30 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

import torch

import hf_kvplus
from hf_kvplus._compat import rope_parameters
from hf_kvplus.rope import shift_keys
from hf_kvplus.storage.base import DenseStore
from hf_kvplus.eval import compression_perplexity, load_default_model, load_default_text, load_default_tokenizer
from hf_kvplus.eval.report import markdown_table, write_json
from hf_kvplus.quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # label -> SimulatedStore keyword arguments (int2, groups of 64, residual 128 unless said)
    "int2 (as QuantizedStore)": {},
    "int2 values only (keys exact)": dict(key_bits=None),
    "int2 keys only (values exact)": dict(value_bits=None),
    "int2 + 4 full-precision sinks": dict(sinks=4),
    "int2 keys per token": dict(keys_per_token=True),
    "int2 keys before RoPE": dict(pre_rope=True),
    "int2 keys before RoPE, key groups of 16": dict(pre_rope=True, group_size=16, value_group=64),
    "int2 residual 256": dict(residual_length=256),
    "int2 keys Hadamard-rotated": dict(rotate=True),
    "int2 keys Hadamard-rotated per token": dict(rotate=True, keys_per_token=True),
    "int2 keys Hadamard-rotated before RoPE + 4 sinks": dict(rotate=True, pre_rope=True, sinks=4),
    "K4V2 (keys int4, values int2)": dict(key_bits=4),
    "int2 keys before RoPE + 4 sinks": dict(pre_rope=True, sinks=4),
    "int2 keys Hadamard-rotated + 4 sinks": dict(rotate=True, sinks=4),
}


def hadamard(size: int, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix ``[size, size]`` (``size`` a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / size**0.5).to(dtype)


class SimulatedStore(DenseStore):
    """Full-precision storage holding, for every quantized token, its dequantized value."""

    def __init__(self, inv_freq, key_bits=2, value_bits=2, group_size=64, residual_length=128, sinks=0,
                 keys_per_token=False, pre_rope=False, value_group=None, rotate=False):
        super().__init__()
        self.inv_freq, self.key_bits, self.value_bits = inv_freq, key_bits, value_bits
        self.group_size, self.residual_length, self.sinks = group_size, residual_length, sinks
        self.keys_per_token, self.pre_rope, self.done = keys_per_token, pre_rope, 0
        self.value_group = value_group or group_size  # capped at head_dim, as in QuantizedStore
        self.rotate = rotate

    def update(self, keys, values):
        out = (keys, values) if self.keys is None else (torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2))
        self.append(keys, values)
        return out

    def append(self, keys, values):
        super().append(keys, values)
        start = max(self.done, self.sinks)
        flush = max(0, (self.keys.shape[2] - start - self.residual_length) // self.group_size) * self.group_size
        if not flush:
            return
        block = slice(start, start + flush)
        k, v = self.keys[:, :, block], self.values[:, :, block]  # [b, h, flush, d]
        positions = torch.arange(start, start + flush)
        if self.key_bits:
            k = shift_keys(k, -positions, self.inv_freq) if self.pre_rope else k
            rotation = hadamard(k.shape[-1], k.dtype) if self.rotate else None
            k = k @ rotation if self.rotate else k
            if self.keys_per_token:
                k = dequantize_values(*quantize_values(k, self.key_bits, k.shape[-1]), self.key_bits)
            else:
                k = dequantize_keys(*quantize_keys(k, self.key_bits, self.group_size), self.key_bits, self.group_size)
            k = k @ rotation.T if self.rotate else k
            k = shift_keys(k, positions, self.inv_freq) if self.pre_rope else k
        if self.value_bits:
            group = min(self.value_group, v.shape[-1])
            v = dequantize_values(*quantize_values(v, self.value_bits, group), self.value_bits)
        self.keys[:, :, block], self.values[:, :, block] = k, v
        self.done = start + flush


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--render", action="store_true", help="only re-render the tables from the saved JSON")
    parser.add_argument("--only", nargs="*", help="run only these variants (labels)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        return write_tables(json.loads((args.out / "quantized_ablation.json").read_text())["rows"], args.out)
    model, tokenizer = load_default_model(), load_default_tokenizer()
    ids = tokenizer(load_default_text(), return_tensors="pt").input_ids[0]
    hf_kvplus.attach(model)
    inv_freq = rope_parameters(model)[0]
    dense = compression_perplexity(model, lambda: hf_kvplus.make_cache("dynamic", model), ids, windows=args.windows)
    rows = [{"variant": "dense fp32", "ppl": dense["ppl"], "ppl_vs_dense_%": 0.0}]
    for label, kwargs in VARIANTS.items():
        if args.only and label not in args.only:
            continue
        factory = functools.partial(SimulatedStore, inv_freq, **kwargs)
        result = compression_perplexity(model, lambda f=factory: hf_kvplus.KVPlusCache(model.config, store_factory=f),
                                        ids, windows=args.windows)
        rows.append({"variant": label, "ppl": result["ppl"], "ppl_vs_dense_%": 100 * (result["ppl"] / dense["ppl"] - 1)})
        print(f"{label}: {result['ppl']:.4f}", flush=True)
    saved = args.out / "quantized_ablation.json"
    if args.only and saved.exists():  # merge into an earlier report: its other rows stay, in the order of VARIANTS
        fresh = {row["variant"]: row for row in rows}
        old = {row["variant"]: row for row in json.loads(saved.read_text())["rows"]}
        merged = {**old, **fresh}
        rows = [merged[label] for label in ["dense fp32", *VARIANTS] if label in merged]
    write_json(saved, {"windows": args.windows, "rows": rows,
                       "command": "PYTHONPATH=. python benchmarks/quantized_ablation.py"})
    write_tables(rows, args.out)


def write_tables(rows: list[dict], out: Path) -> None:
    """Print the table, write it to ``out`` and, for the default ``out``, into the docs page."""
    table = markdown_table([{**r, "ppl": f"{r['ppl']:.3f}", "ppl_vs_dense_%": f"{r['ppl_vs_dense_%']:.1f}"} for r in rows])
    print(table)
    (out / "quantized_ablation.md").write_text(table)
    doc = ROOT / "docs" / "strategies" / "quantized.md"
    if doc.exists() and out == ROOT / "benchmarks" / "results":
        pattern = r"(<!-- ablation:start -->\n).*?(<!-- ablation:end -->)"
        doc.write_text(re.sub(pattern, lambda m: m.group(1) + table + m.group(2), doc.read_text(), flags=re.S))


if __name__ == "__main__":
    main()
