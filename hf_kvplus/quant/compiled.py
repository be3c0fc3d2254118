"""A packed KV history restored in one compiled pass: packed codes to the model dtype, residual included.

The eager hot path (:func:`.fused.dequantize_history`) runs about eight aten ops per layer, each a pass over the
history. Here one pointwise function of the packed buffers is compiled with ``torch.compile`` (inductor, its C++
backend on CPU) into a single loop that reads each byte of codes and writes each restored value once, into the
contiguous scratch view of :meth:`.fused.DequantScratch.restored`:

``keys[b, h, t, c] = code * scale + zero`` for the ``nq`` history tokens (scales per channel and group of tokens
for keys, per token and group of channels for values: KIVI's layout, arXiv:2402.02750), then the residual buffer
copied as is, the same for values; keys and values are the two halves of the scratch view, written whole (inductor
writes a whole contiguous output in place, but goes through a temporary for a strided one). Sizes are dynamic in the token dimensions (the history
grows every ``group_size`` steps and its buffers double), so one graph serves a whole generation; a kernel is
compiled lazily, once per (bits, groups, dtype, device, batch, heads, head_dim, residual slots).

Numerics: computed in float32 and rounded once to the model dtype. For float32 models that equals the eager
path's ``addcmul`` / ``mul_`` + ``add_`` exactly; for bfloat16/float16 keys are equal and values may differ by
one rounding of ``code * scale`` (the eager path rounds twice).

Dispatch: the kernel runs behind one operator, ``torch.ops.hf_kvplus.restore_packed``, so it is one op (one
kernel launch) to anything counting ops, and the compiled code runs even under a ``TorchDispatchMode``.
"""

from __future__ import annotations

import logging
import types
import warnings

import torch

from .packing import codes_per_byte

logger = logging.getLogger(__name__)

DEQUANT_MODES = ("auto", "compiled", "eager")
AUTO_MIN_TOKENS = 4096  # "auto" compiles once a layer's packed history holds this many tokens
COMPILE_OPTIONS = {
    # Every index the kernel computes is clamped into its buffer (see `_kernel`): no bounds check per element
    # (with checks inductor's loop runs about 1.5x slower on CPU).
    "assert_indirect_indexing": False,
}

_kernels: dict = {}  # key -> compiled callable
_failed: dict = {}  # device type -> why compilation is unavailable there


def check_dequant(mode) -> str:
    """``mode`` if it is one of :data:`DEQUANT_MODES`, else a ``ValueError`` naming the allowed values."""
    if mode not in DEQUANT_MODES:
        raise ValueError(f"dequant must be one of {list(DEQUANT_MODES)}, got {mode!r}")
    return mode


def unavailable(device: torch.device) -> str | None:
    """Why the compiled path cannot run on ``device`` (``None`` when it can, as far as is known before compiling)."""
    if device.type != "cpu":
        return f"compiled dequantization is checked on CPU only so far, not on {device.type}"
    return _failed.get(device.type)


def wanted(mode: str, tokens: int, group_size: int, device: torch.device) -> bool:
    """Whether a store in ``mode`` restores a history of ``tokens`` with the compiled kernel.

    ``"eager"``: never. ``"compiled"``: whenever it can run (CPU with a working C++ compiler) and the history holds
    two key groups or more (buffer sizes 0 and 1 would be specialized by ``torch.compile``). ``"auto"``: the same,
    from :data:`AUTO_MIN_TOKENS` history tokens on, where a step saves milliseconds per layer and the compilation
    (seconds, once per process and shape) pays for itself.
    """
    if mode == "eager" or tokens < 2 * group_size or unavailable(device) is not None:
        return False
    return mode == "compiled" or tokens >= AUTO_MIN_TOKENS


def _kernel(nbits: int, group_size: int, value_group: int):
    """The pointwise restoration (plain torch, so it also runs eagerly: the reference of the compiled kernel)."""
    k, mask = codes_per_byte(nbits), (1 << nbits) - 1

    def restore(keys, values, codes, key_params, value_params, res):
        # keys, values [b, h, nq + slots, d] (written; contiguous); codes [2, b, h, capacity, d / k] uint8;
        # key_params [2 (scale, zero), b, h, row capacity, d]; value_params [2, b, h, capacity, d / value_group];
        # res [2, b, h, slots, d] in the model dtype.
        total, d = keys.shape[2], keys.shape[3]
        nq = total - res.shape[3]
        t = torch.arange(total, device=keys.device)  # [total]
        held = t.clamp(max=nq - 1)  # the history token read at t (clamped: every read is in bounds)
        fresh = (t - nq).clamp(min=0)  # the residual slot read at t
        in_history = (t < nq).view(total, 1)
        shift = (torch.arange(d, device=keys.device) // (d // k) * nbits).to(torch.uint8)  # [d]

        def unpacked(packed):  # [b, h, capacity, d / k] -> codes at `held` as floats, [b, h, total, d]
            packed = packed[:, :, held]
            if k > 1:  # split order (see .packing): channel c is in byte c % (d / k), bits (c // (d / k)) * nbits
                packed = (packed.repeat(1, 1, 1, k) >> shift) & mask
            return packed.float()

        key_scale, key_zero = key_params[:, :, :, held // group_size].float()  # [b, h, total, d] each
        channel_group = torch.arange(d, device=keys.device) // value_group  # [d]
        value_scale, value_zero = value_params[:, :, :, held][..., channel_group].float()  # [b, h, total, d] each
        keys.copy_(torch.where(in_history, unpacked(codes[0]) * key_scale + key_zero, res[0][:, :, fresh].float()))
        values.copy_(torch.where(in_history, unpacked(codes[1]) * value_scale + value_zero,
                                 res[1][:, :, fresh].float()))

    return restore


def reference(keys, values, codes, key_params, value_params, res, nbits: int, group_size: int, value_group: int):
    """The compiled kernel's function run eagerly (the fallback of a failed compilation; many ops)."""
    _kernel(nbits, group_size, value_group)(keys, values, codes, key_params, value_params, res)


def _compiled(key: tuple):
    """The compiled kernel for ``key``, made on first use with its own code object, so every key has its own
    ``torch.compile`` cache (and recompile limit)."""
    if key not in _kernels:
        fn = _kernel(*key[:3])
        name = "restore_packed_" + "_".join(str(part).replace(".", "_") for part in key)
        code = fn.__code__.replace(co_name=name)
        fn = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        _kernels[key] = [torch.compile(fn, fullgraph=True, options=COMPILE_OPTIONS), False]
    return _kernels[key]


def _first_call(fn, args) -> None:
    """Compile and run, with every token dimension dynamic and without duck sizing (sizes equal at the first call,
    say the history capacity and the output length, must not be assumed equal later)."""
    from torch.fx.experimental import _config as shape_config  # private torch; checked on torch 2.13

    for tensor, dim in zip(args[:5], (2, 2, 3, 3, 3), strict=False):
        torch._dynamo.mark_dynamic(tensor, dim)
    with shape_config.patch(use_duck_shape=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "bf16 and fp16 are mixed", UserWarning)  # inductor's note on the scales
        fn(*args)


def _restore_impl(keys, values, codes, key_params, value_params, res, nbits: int, group_size: int, value_group: int):
    key = (nbits, group_size, value_group, keys.dtype, keys.device.type, *keys.shape[:2], keys.shape[3], res.shape[3])
    entry = _compiled(key)
    args = (keys, values, codes, key_params, value_params, res)
    if keys.device.type in _failed:
        return reference(keys, values, codes, key_params, value_params, res, nbits, group_size, value_group)
    try:
        if entry[1]:
            entry[0](*args)
        else:
            _first_call(entry[0], args)
            entry[1] = True
    except Exception as error:  # no C++ compiler, an inductor failure...: the eager path from now on
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        _failed[keys.device.type] = reason
        warnings.warn(f"hf_kvplus: compiled dequantization is unavailable ({reason}); using the eager path",
                      RuntimeWarning, stacklevel=2)
        logger.warning("compiled dequantization unavailable on %s: %s", keys.device.type, reason)
        reference(keys, values, codes, key_params, value_params, res, nbits, group_size, value_group)


_library = torch.library.Library("hf_kvplus", "DEF")  # noqa: TOR901 (a fresh namespace, ours)
_library.define(
    "restore_packed(Tensor(a!) keys, Tensor(b!) values, Tensor codes, Tensor key_params, Tensor value_params, Tensor res, int nbits, "
    "int group_size, int value_group) -> ()"
)
_library.impl("restore_packed", _restore_impl, "CPU")


def restore_packed(keys, values, codes, key_params, value_params, res, nbits: int, group_size: int,
                   value_group: int) -> None:
    """Write a layer's restored history and residual into ``keys`` and ``values`` (one op; shapes in ``_kernel``).

    Falls back to :func:`reference` (with one ``RuntimeWarning`` naming the reason) where compilation fails;
    :func:`wanted` keeps later steps on the eager path then. Inside a compiled model the function is traced
    instead, so the outer compilation fuses it into its own graph.
    """
    if torch.compiler.is_compiling():
        return reference(keys, values, codes, key_params, value_params, res, nbits, group_size, value_group)
    torch.ops.hf_kvplus.restore_packed(keys, values, codes, key_params, value_params, res, nbits, group_size,
                                       value_group)
