"""Which store a cache's storage keywords ask for: full precision (``DenseStore``) or packed (``QuantizedStore``)."""

from __future__ import annotations

from .base import DenseStore
from .packed import quantized_store_factory

STORAGE_KEYWORDS = ("nbits", "group_size", "residual_length", "scale_dtype", "backend")


def make_store_factory(store_factory=None, nbits=None, **quantization):
    """The store factory for a cache's storage keywords (every ``KVPlusCache`` strategy accepts them).

    Args:
        store_factory (`Callable[[], KVStore]`, *optional*): an explicit factory; excludes the other keywords.
        nbits (`int`, *optional*): ``None`` keeps tokens in the model's dtype; 8, 4 or 2 packs them
            (:class:`~hf_kvplus.storage.packed.QuantizedStore`).
        **quantization: ``group_size``, ``residual_length``, ``scale_dtype`` and ``backend`` of the
            quantized store (see :func:`~hf_kvplus.quantized.quantized_store_factory`).

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
    if store_factory is not None:
        if nbits is not None or given:
            raise ValueError(f"pass either store_factory or storage keywords, not both (got {sorted(given) or ['nbits']})")
        if not callable(store_factory):
            raise TypeError(f"store_factory must be callable (returning a KVStore), got {type(store_factory).__name__}")
        return store_factory
    if nbits is None:
        if given:
            raise ValueError(
                f"{sorted(given)} only apply to quantized storage: also pass nbits (one of {{8, 4, 2}}), got nbits=None"
            )
        return DenseStore

    return quantized_store_factory(nbits=nbits, **given)
