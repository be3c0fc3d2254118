"""Quantization kernels in plain torch: bit packing and KIVI-style min/max (de)quantization (eager); the decode
hot path's fused eager ops live in :mod:`.fused`, its one-pass compiled kernel in :mod:`.compiled`."""

from .minmax import (
    BACKENDS,
    SCALE_DTYPES,
    check_backend,
    check_scale_dtype,
    dequantize_keys,
    dequantize_values,
    minmax_quantize,
    quantize_keys,
    quantize_values,
)
from .packing import SUPPORTED_NBITS, check_nbits, pack, packed_size, unpack

__all__ = [
    "BACKENDS",
    "SCALE_DTYPES",
    "SUPPORTED_NBITS",
    "check_backend",
    "check_nbits",
    "check_scale_dtype",
    "dequantize_keys",
    "dequantize_values",
    "minmax_quantize",
    "pack",
    "packed_size",
    "quantize_keys",
    "quantize_values",
    "unpack",
]
