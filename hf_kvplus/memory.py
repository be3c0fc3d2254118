"""Bytes a cache really holds, and process-level peak memory.

``cache_nbytes`` counts the storage behind every tensor a cache references: packed codes, scales,
zero points, residual windows, positions and scores. Storage shared by several tensors (a prefix
reused by many requests, a view of a larger buffer) is counted once, at its full size, because
that is the memory it pins.
"""

from __future__ import annotations

import resource
import sys

import torch


def _iter_tensors(obj, seen_objects: set[int], depth: int = 0):
    if depth > 6 or id(obj) in seen_objects:
        return
    seen_objects.add(id(obj))
    if isinstance(obj, torch.Tensor):
        flatten = getattr(type(obj), "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()  # tensor subclasses (e.g. optimum-quanto) wrap inner tensors
            for name in names:
                yield from _iter_tensors(getattr(obj, name), seen_objects, depth + 1)
        else:
            yield obj
        return
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _iter_tensors(value, seen_objects, depth + 1)
        return
    if isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _iter_tensors(value, seen_objects, depth + 1)
        return
    if isinstance(obj, torch.nn.Module):
        return  # a cache never owns model weights
    tensors = getattr(obj, "tensors", None)
    if callable(tensors) and getattr(type(obj), "__module__", "").startswith("hf_kvplus"):
        for tensor in tensors():
            yield from _iter_tensors(tensor, seen_objects, depth + 1)
        return
    attributes = getattr(obj, "__dict__", None)
    if attributes is not None:
        for value in attributes.values():
            yield from _iter_tensors(value, seen_objects, depth + 1)


def held_tensors(*objects) -> list[torch.Tensor]:
    """Every tensor reachable from ``objects`` (caches, layers, stores), each storage once."""
    seen_objects: set[int] = set()
    seen_storages: set[tuple[str, int]] = set()
    found = []
    for obj in objects:
        layers = getattr(obj, "layers", None)
        roots = layers if isinstance(layers, list) else [obj]
        for root in roots:
            for tensor in _iter_tensors(root, seen_objects):
                if tensor.device.type == "meta":
                    continue
                key = (str(tensor.device), tensor.untyped_storage().data_ptr())
                if key in seen_storages or tensor.untyped_storage().nbytes() == 0:
                    continue
                seen_storages.add(key)
                found.append(tensor)
    return found


def cache_nbytes(*caches) -> int:
    """Bytes held by the tensors of one or more caches, shared storage counted once.

    Args:
        *caches: ``transformers.Cache`` objects (hf_kvplus caches, ``DynamicCache``,
            ``QuantizedCache``...), cache layers, or a ``PrefixStore``.

    Returns:
        `int`: the sum of the storage sizes of every distinct tensor the caches reference.

    Example:

    ```python
    >>> cache = hf_kvplus.make_cache("sink", model, budget=256)
    >>> model.generate(**inputs, cache=cache, max_new_tokens=64)
    >>> hf_kvplus.cache_nbytes(cache) / 2**20  # MiB
    ```
    """
    for cache in caches:
        if isinstance(cache, (str, bytes, int, float, torch.nn.Module)):  # None (no cache) holds 0 bytes
            raise TypeError(
                f"cache_nbytes counts caches (transformers.Cache), cache layers, KV stores, a PrefixStore or tensors; "
                f"got {type(cache).__name__}"
            )
    return sum(t.untyped_storage().nbytes() for t in held_tensors(*caches))


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, bytes_per_element: float) -> float:
    """Dense KV bytes per token: ``2 * layers * kv_heads * head_dim * bytes_per_element``."""
    return 2 * num_layers * kv_heads * head_dim * bytes_per_element


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Current resident set size of this process (bytes), from /proc on Linux."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def device_peak_bytes(device: torch.device | str) -> int | None:
    """``torch.cuda.max_memory_allocated`` on CUDA devices, ``None`` elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    return None


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new peak measurement: CUDA's allocator peak on CUDA, the process's peak RSS on Linux.

    Linux resets the resident-set high-water mark when ``5`` is written to ``/proc/self/clear_refs``;
    elsewhere the CPU peak stays the process-wide peak since start-up.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device | str = "cpu") -> dict:
    """Peak memory since the last :func:`reset_peak_memory`.

    Returns:
        `dict`: ``peak_rss_bytes`` (this process's resident-set high-water mark) and ``device_peak_bytes``
        (``torch.cuda.max_memory_allocated`` on CUDA, else ``None``).
    """
    rss = None
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"peak_rss_bytes": rss if rss is not None else peak_rss_bytes(), "device_peak_bytes": device_peak_bytes(device)}
