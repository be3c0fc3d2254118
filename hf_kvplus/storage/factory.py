"""Which store a cache's storage keywords ask for: full precision (``DenseStore``) or packed (``QuantizedStore``)."""

from __future__ import annotations

import functools

import torch

from ..quant.fused import DequantScratch
from ..quant.rotation import KeyBasis
from .base import DenseStore
from .packed import DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL_LENGTH, QuantizedStore

STORAGE_KEYWORDS = ("nbits", "group_size", "residual_length", "scale_dtype", "backend", "dequant", "key_bits",
                    "value_bits", "rotation", "sinks", "pre_rope")


def make_store_factory(store_factory=None, nbits=None, **quantization):
    """The store factory for a cache's storage keywords (every ``KVPlusCache`` strategy accepts them).

    Args:
        store_factory (`Callable[[], KVStore]`, *optional*): an explicit factory; excludes the other keywords.
        nbits (`int`, *optional*): ``None`` keeps tokens in the model's dtype; 8, 4 or 2 packs them
            (:class:`~hf_kvplus.storage.packed.QuantizedStore`).
        **quantization: ``group_size``, ``residual_length``, ``scale_dtype`` and ``backend`` of the
            quantized store (see :func:`quantized_store_factory`).

    Example:

    ```python
    >>> factory = make_store_factory(nbits=4, group_size=32, residual_length=64)
    >>> cache = hf_kvplus.make_cache("sink", model, budget=256, store_factory=factory)
    ```
    """
    unknown = sorted(set(quantization) - set(STORAGE_KEYWORDS))
    if unknown:
        raise TypeError(f"unknown storage keyword(s) {unknown}; storage accepts {list(STORAGE_KEYWORDS)}")
    given = {name: value for name, value in quantization.items() if value is not None}
    if given.get("sinks") or given.get("pre_rope"):  # positions and first tokens move when a cache evicts
        name = "sinks" if given.get("sinks") else "pre_rope"
        raise ValueError(
            f"{name}={given[name]!r} is for packed storage in caches that keep every token (make_cache('quantized', "
            f"..., {name}=...), preset 'int2r'): an evicting cache moves tokens away from their first positions"
        )
    given.pop("pre_rope", None), given.pop("sinks", None)
    if store_factory is not None:
        if nbits is not None or given:
            raise ValueError(f"pass either store_factory or storage keywords, not both (got {sorted(given) or ['nbits']})")
        if not callable(store_factory):
            raise TypeError(f"store_factory must be callable (returning a KVStore), got {type(store_factory).__name__}")
        return store_factory
    if nbits is None and given.get("key_bits") is not None and given.get("value_bits") is not None:
        nbits = given["key_bits"]  # both given: nbits is only their default
    if nbits is None:
        if given:
            raise ValueError(
                f"{sorted(given)} only apply to quantized storage: also pass nbits (one of {{8, 4, 2}}), got nbits=None"
            )
        return DenseStore

    return quantized_store_factory(nbits=nbits, **given)


def quantized_store_factory(nbits: int, group_size=None, residual_length=None, scale_dtype=None, backend=None,
                            scratch: bool = False, dequant=None, key_bits=None, value_bits=None, rotation=None,
                            sinks=None, rope=None):
    """A factory of :class:`QuantizedStore`, arguments checked now rather than at the first token.

    Args:
        nbits (`int`): 8, 4 or 2.
        group_size (`int`, *optional*, defaults to 64): key tokens / value channels per group.
        residual_length (`int`, *optional*, defaults to 128): newest tokens kept in full precision.
        scale_dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): scales and zero points.
        backend (`str`, *optional*, defaults to ``"torch"``): the kernels, ``"torch"`` or ``"quanto"``
            (optimum-quanto's rounding and unpacking on the same layout; ``pip install "hf_kvplus[quanto]"``).
        scratch (`bool`, defaults to `False`): give the stores one shared
            :class:`~hf_kvplus.quant.fused.DequantScratch`, so decoding steps restore the history in a few ops
            into it (layers that never evict; an evicting layer re-lays out its history at every eviction).
        dequant (`str`, *optional*, defaults to ``"auto"``): ``"auto"``, ``"compiled"`` or ``"eager"``: how those
            steps restore it (see :class:`~hf_kvplus.storage.packed.QuantizedStore`).
        key_bits, value_bits (`int`, *optional*): 8, 4 or 2 bits of keys and of values (``nbits`` if not given).
        rotation (`str`, *optional*): ``"hadamard"``: keys rotated per head before quantization (one matrix shared by
            the stores of the factory).
        sinks (`int`, *optional*, defaults to 0): first tokens held in full precision.
        rope (`tuple`, *optional*): the model's ``(inv_freq, attention_scaling, layout)``: keys quantized before RoPE.

    Example:

    ```python
    >>> factory = quantized_store_factory(nbits=2, group_size=32, residual_length=64)
    >>> store = factory()
    ```
    """
    if rope is not None:  # frequencies as floats: the factory (held by every layer) holds no tensor
        rope = (tuple(float(f) for f in torch.as_tensor(rope[0]).tolist()), *rope[1:])
    kwargs = dict(
        backend="torch" if backend is None else backend,
        nbits=nbits,
        group_size=DEFAULT_GROUP_SIZE if group_size is None else group_size,
        residual_length=DEFAULT_RESIDUAL_LENGTH if residual_length is None else residual_length,
        scale_dtype=torch.float16 if scale_dtype is None else scale_dtype,
        dequant="auto" if dequant is None else dequant,
        key_bits=key_bits,
        value_bits=value_bits,
        rotation=rotation,
        sinks=0 if sinks is None else sinks,
        rope=rope,
    )
    QuantizedStore(**kwargs)  # validates
    if rotation is not None or rope is not None:
        kwargs["basis"] = KeyBasis(rope)  # one rotation matrix (and RoPE tables) per cache
    if scratch:  # one per factory, so per cache: every layer restores its history into the same buffers
        kwargs["scratch"] = DequantScratch(planes=2 if rotation is None and rope is None else 3)
    return functools.partial(QuantizedStore, **kwargs)
