"""optimum-quanto kernels behind hf_kvplus's storage layout (``backend="quanto"``).

The codes, scales and packed bytes are laid out exactly as with the default torch kernels, so a
``QuantizedStore`` keeps every feature (eviction, beam reordering, exact byte counts); only the
rounding of codes (``quanto::quantize_affine``) and the unpacking of int4/int2 bytes
(``quanto::unpack``, a compiled C++ kernel on CPU and CUDA kernels on GPU) run in optimum-quanto.
quanto unpacks along the first dimension in the same split order as :func:`hf_kvplus.quant.unpack`
uses along the last one, so the bytes are moved to the front for the call.
"""

from __future__ import annotations

import importlib.util

import torch

INSTALL_HINT = 'pip install "hf_kvplus[quanto]" (optimum-quanto>=0.2.7)'


def require_quanto() -> None:
    """Import optimum-quanto (which registers its ``torch.ops.quanto`` kernels) or explain how to install it."""
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        raise ImportError(f"backend='quanto' needs optimum-quanto, which is not installed: {INSTALL_HINT}")
    import optimum.quanto  # noqa: F401


def quanto_codes(x32: torch.Tensor, nbits: int, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``round((x - zero) / scale)`` clamped to ``[0, 2**nbits - 1]`` by ``quanto::quantize_affine``."""
    require_quanto()
    scale = scale.float().masked_fill(scale == 0, 1.0)  # constant groups: every code is 0 anyway
    return torch.ops.quanto.quantize_affine(x32, nbits, -1, None, scale, -zero.float())


def quanto_unpack(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Same result as :func:`hf_kvplus.quant.unpack` (``[..., w]`` bytes to ``[..., w * 8 / nbits]`` codes)."""
    if nbits == 8:
        return packed
    require_quanto()
    width = packed.shape[-1]
    front = packed.reshape(-1, width).t().contiguous()  # [w, rows]: quanto unpacks along dim 0
    codes = torch.ops.quanto.unpack(front, nbits)  # [w * 8 / nbits, rows]
    return codes.t().reshape(*packed.shape[:-1], codes.shape[0])
