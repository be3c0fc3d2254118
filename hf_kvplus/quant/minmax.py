"""Asymmetric min/max quantization of KV tensors in plain torch (KIVI, arXiv 2402.02750).

A group of values ``x`` becomes ``codes = round((x - zero) / scale)`` in ``[0, 2**nbits - 1]`` with
``zero = min(x)`` and ``scale = (max(x) - min(x)) / (2**nbits - 1)``; it comes back as
``zero + codes * scale``. ``zero`` and ``scale`` are stored in a compact dtype (``float16`` by
default) and rounded so the stored range still covers the group (``zero`` down, ``scale`` up): the
error is at most half a step, ``scale / 2``, for every value.

KIVI's layout for a block of ``[batch, heads, tokens, head_dim]``:

* keys per **channel**, in groups of ``group_size`` consecutive tokens (key outliers live in fixed
  channels), scales ``[batch, heads, tokens / group_size, head_dim]``;
* values per **token**, in groups of ``group_size`` consecutive channels, scales
  ``[batch, heads, tokens, head_dim / group_size]``.

Codes are packed along ``head_dim`` (:mod:`.packing`), so every token stays whole bytes.
"""

from __future__ import annotations

import torch

from .packing import check_nbits, pack, packed_size, unpack

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("torch", "quanto")


def check_backend(backend) -> str:
    """``backend`` if it is one of :data:`BACKENDS` and usable here (``"quanto"`` needs optimum-quanto)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "quanto":
        from .quanto import require_quanto

        require_quanto()
    return backend


def _unpack(packed: torch.Tensor, nbits: int, backend: str) -> torch.Tensor:
    if backend == "quanto":
        from .quanto import quanto_unpack

        return quanto_unpack(packed, nbits)
    return unpack(packed, nbits)


def check_scale_dtype(dtype) -> torch.dtype:
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of torch.float16, torch.bfloat16, torch.float32, got {dtype!r}")
    return dtype


def _round(t: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """``t`` (float32) in ``dtype``, rounded down (or up) so the stored value never shrinks the range."""
    r = t.to(dtype)
    if dtype == torch.float32:
        return r
    wrong = r.float() > t if down else r.float() < t
    step = torch.full_like(r, -torch.inf if down else torch.inf)
    return torch.where(wrong, torch.nextafter(r, step), r)


def minmax_quantize(
    x: torch.Tensor,
    nbits: int,
    dim: int,
    scale_dtype: torch.dtype = torch.float16,
    valid: torch.Tensor | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize groups of ``x`` formed by reducing over ``dim``.

    Args:
        x (`torch.Tensor`): any float tensor.
        nbits (`int`): 8, 4 or 2.
        dim (`int`): the dimension each group spans.
        scale_dtype (`torch.dtype`, defaults to `torch.float16`): dtype of the stored scales and zero points.
        valid (`torch.BoolTensor`, *optional*): broadcastable to ``x``; only valid entries set the range.
        backend (`str`, defaults to ``"torch"``): ``"quanto"`` rounds the codes with optimum-quanto.

    Returns:
        `tuple`: ``codes`` (``uint8``, shape of ``x``), ``scale`` and ``zero`` (``x``'s shape with ``dim`` of size 1).

    Example:

    ```python
    >>> codes, scale, zero = minmax_quantize(torch.randn(4, 32), nbits=4, dim=-1)
    >>> restored = zero.float() + codes * scale.float()  # error at most scale / 2
    ```
    """
    levels = (1 << check_nbits(nbits)) - 1
    check_scale_dtype(scale_dtype)
    x32 = x.float()
    if valid is None:
        lo, hi = x32.amin(dim, keepdim=True), x32.amax(dim, keepdim=True)
    else:
        lo = x32.masked_fill(~valid, torch.inf).amin(dim, keepdim=True)
        hi = x32.masked_fill(~valid, -torch.inf).amax(dim, keepdim=True)
        empty = torch.isinf(lo)  # a group with no valid entry: any range will do
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    largest = torch.finfo(scale_dtype).max
    if bool((lo < -largest).any() or (hi > largest).any()):
        raise ValueError(
            f"values up to {float(x32.abs().max()):.4g} do not fit scales in {scale_dtype}: pass "
            "scale_dtype=torch.bfloat16 or torch.float32"
        )
    zero = _round(lo, scale_dtype, down=True)
    scale = _round((hi - zero.float()) / levels, scale_dtype, down=False)
    if backend == "quanto":
        from .quanto import quanto_codes

        return quanto_codes(x32, nbits, scale, zero), scale, zero
    inverse = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros_like(scale, dtype=torch.float32))
    codes = ((x32 - zero.float()) * inverse).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def _check_group(size: int, group_size: int, what: str) -> int:
    if size % group_size:
        raise ValueError(f"{what} ({size}) must be a multiple of group_size ({group_size})")
    return size // group_size


def quantize_keys(keys: torch.Tensor, nbits: int, group_size: int, scale_dtype=torch.float16, valid=None,
                  backend="torch"):
    """Keys ``[b, h, t, d]`` per channel in groups of ``group_size`` tokens (``t`` a multiple of it).

    ``valid`` (``[b, h, t]``) restricts each group's range to some tokens. Returns ``packed``
    ``[b, h, t, d * nbits / 8]`` and ``scale``, ``zero`` ``[b, h, t / group_size, d]``.
    """
    b, h, t, d = keys.shape
    groups = _check_group(t, group_size, "tokens to quantize")
    packed_size(d, nbits)
    grouped = keys.reshape(b, h, groups, group_size, d)
    mask = None if valid is None else valid.reshape(b, h, groups, group_size, 1)
    codes, scale, zero = minmax_quantize(grouped, nbits, 3, scale_dtype, valid=mask, backend=backend)
    return pack(codes.view(b, h, t, d), nbits), scale.squeeze(3), zero.squeeze(3)


def quantize_values(values: torch.Tensor, nbits: int, group_size: int, scale_dtype=torch.float16, backend="torch"):
    """Values ``[b, h, t, d]`` per token in groups of ``group_size`` channels (``d`` a multiple of it).

    Returns ``packed`` ``[b, h, t, d * nbits / 8]`` and ``scale``, ``zero`` ``[b, h, t, d / group_size]``.
    """
    b, h, t, d = values.shape
    groups = _check_group(d, group_size, "head_dim")
    packed_size(d, nbits)
    grouped = values.reshape(b, h, t, groups, group_size)
    codes, scale, zero = minmax_quantize(grouped, nbits, 4, scale_dtype, backend=backend)
    return pack(codes.view(b, h, t, d), nbits), scale.squeeze(4), zero.squeeze(4)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (``[b, h, g, d]``) along dim 2 at ``index`` (``[t]`` or ``[b, h, t]``)."""
    if index.dim() == 1:
        return x.index_select(2, index)
    return torch.gather(x, 2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def dequantize_keys(packed, scale, zero, nbits: int, group_size: int, group_map=None, dtype=torch.float32, out=None,
                    backend="torch"):
    """Inverse of :func:`quantize_keys`: ``[b, h, t, d]`` in ``dtype`` (written into ``out`` if given).

    ``group_map`` (``[t]`` or ``[b, h, t]``) gives each token's row of ``scale``/``zero`` once tokens
    were dropped or grouped irregularly; ``None`` means token ``i`` is in group ``i // group_size``.
    """
    codes = _unpack(packed, nbits, backend)  # [b, h, t, d] uint8
    b, h, t, d = codes.shape
    out = torch.empty(b, h, t, d, dtype=dtype, device=codes.device) if out is None else out
    scale, zero = scale.to(dtype), zero.to(dtype)
    # In place, one op at a time: faster on CPU than a broadcasting addcmul (measured in benchmarks/quantized.py).
    if group_map is None:
        g = _check_group(t, group_size, "quantized tokens")
        view = out.view(b, h, g, group_size, d)
        view.copy_(codes.view(b, h, g, group_size, d)).mul_(scale.unsqueeze(3)).add_(zero.unsqueeze(3))
    else:
        out.copy_(codes).mul_(_rows(scale, group_map)).add_(_rows(zero, group_map))
    return out


def dequantize_values(packed, scale, zero, nbits: int, dtype=torch.float32, out=None, backend="torch"):
    """Inverse of :func:`quantize_values`: ``[b, h, t, d]`` in ``dtype`` (written into ``out`` if given)."""
    codes = _unpack(packed, nbits, backend)  # [b, h, t, d] uint8
    b, h, t, d = codes.shape
    g = scale.shape[-1]
    out = torch.empty(b, h, t, d, dtype=dtype, device=codes.device) if out is None else out
    view = out.view(b, h, t, g, d // g)
    view.copy_(codes.view(b, h, t, g, d // g)).mul_(scale.to(dtype).unsqueeze(4)).add_(zero.to(dtype).unsqueeze(4))
    return out
