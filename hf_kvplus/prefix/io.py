"""Saving and loading a :class:`~hf_kvplus.PrefixStore` with safetensors (no pickle), and model fingerprints.

One file holds, for node ``i`` of the tree (parents first): ``node{i}.keys`` and ``node{i}.values``
(``[layers, kv_heads, n_i, head_dim]``), plus ``tokens`` (every edge's ids, concatenated) and
``nodes`` (``[num_nodes, 2]``: parent index or -1, edge length). The header metadata holds the format
name and version, the block size, the model fingerprint and a SHA-256 checksum of the metadata and
every tensor's bytes.

The fingerprint names the model the KV belongs to: config fields that shape the KV (layers, KV heads,
head dim, dtype, RoPE parameters, vocabulary and hidden sizes) and a SHA-256 of the first decoder
layer's weights, which tells apart two fine-tunes with the same config (their KV differ everywhere).
Loading checks everything, in this order: a readable safetensors file, the format, the version, the
checksum (a truncated or modified file), the fingerprint (another model), then the tree's structure,
and raises a ``ValueError`` naming what is wrong. The checksum detects corruption and edits by tools
that do not recompute it; it is not a signature against a deliberate forgery.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from ..config import kv_geometry, text_config

FORMAT = "hf_kvplus.prefix_store"
VERSION = "1"


def _first_layer(model: torch.nn.Module, num_layers: int) -> torch.nn.Module | None:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module[0]
    return None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> fingerprint, hashed once


def model_fingerprint(model_or_config) -> dict:
    """What identifies the KV a model computes; ``None`` values are unknown (a config has no weights).

    A model's fingerprint is computed once per model object (hashing weights takes tens of ms).
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    if model is not None and model in _FINGERPRINTS:
        return dict(_FINGERPRINTS[model])
    config = getattr(model, "config", None) if model is not None else model_or_config
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"expected a transformers model or PreTrainedConfig, got {type(model_or_config).__name__}")
    layers, kv_heads, head_dim = kv_geometry(config)
    text = text_config(config)
    dtype = next(model.parameters()).dtype if model is not None else getattr(text, "dtype", None)
    weights = None
    layer = _first_layer(model, layers) if model is not None else None
    if layer is not None:
        digest = hashlib.sha256()
        for name, param in layer.named_parameters():
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            digest.update(_tensor_bytes(param))
        weights = digest.hexdigest()
    rope = getattr(text, "rope_parameters", None)
    found = {
        "model_type": text.model_type, "num_layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "hidden_size": getattr(text, "hidden_size", None), "vocab_size": getattr(text, "vocab_size", None),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "rope": None if rope is None else json.dumps(rope, sort_keys=True, default=str),
        "first_layer_sha256": weights,
    }
    if model is not None:
        _FINGERPRINTS[model] = dict(found)
    return found


def check_fingerprint(expected: dict, found: dict, what: str) -> dict:
    """Raise a ``ValueError`` listing the fields that differ (unknown ones are skipped); returns the merge."""
    differ = [k for k in sorted(set(expected) | set(found))
              if expected.get(k) is not None and found.get(k) is not None and expected[k] != found[k]]
    if differ:
        details = "; ".join(f"{k}: {expected[k]!r} vs {found[k]!r}" for k in differ)
        raise ValueError(f"{what} holds the KV of another model ({details})")
    return {k: expected.get(k) if expected.get(k) is not None else found.get(k) for k in set(expected) | set(found)}


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def save_store(store, tree, path) -> None:
    """Write ``tree`` (the store's, lock held by the caller) to ``path``; see the module docstring."""
    from safetensors.torch import save_file

    if store.fingerprint is None:
        raise ValueError("this PrefixStore is bound to no model yet: call store.bind(model) (cache_for does) before save")
    order, queue = [], list(tree.root.children.values())
    while queue:  # breadth first: parents before children
        node = queue.pop(0)
        order.append(node)
        queue.extend(node.children.values())
    index = {node.id: i for i, node in enumerate(order)}
    tensors, tokens, table = {}, [], []
    for i, node in enumerate(order):
        stop = node.start + len(node.tokens)
        parts = [payload.get() for payload in node.payload]
        tensors[f"node{i}.keys"] = torch.cat([k[:, :, node.start : stop] for k, _ in parts]).cpu()  # [layers, h, n, d]
        tensors[f"node{i}.values"] = torch.cat([v[:, :, node.start : stop] for _, v in parts]).cpu()
        tokens.extend(node.tokens)
        table.append([index.get(node.parent.id, -1), len(node.tokens)])
    tensors["tokens"] = torch.tensor(tokens, dtype=torch.long)
    tensors["nodes"] = torch.tensor(table, dtype=torch.long).reshape(-1, 2)
    metadata = {"format": FORMAT, "version": VERSION, "block_size": str(tree.block_size),
                "max_bytes": json.dumps(tree.max_bytes), "fingerprint": json.dumps(store.fingerprint, sort_keys=True)}
    metadata["checksum"] = _checksum(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def load_store(cls, path, model_or_config, max_bytes=None, **kwargs):
    """Read a file written by :func:`save_store`; ``max_bytes`` defaults to the saved store's budget."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no PrefixStore file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors raises its own error types for unreadable headers and data
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a hf_kvplus PrefixStore file (format {metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path} has PrefixStore format version {metadata.get('version')!r}; this hf_kvplus reads {VERSION!r}")
    if metadata.get("checksum") != _checksum(tensors, metadata):
        raise ValueError(f"{path} fails its checksum: the file was modified or corrupted after it was saved")
    saved = json.loads(metadata["fingerprint"])
    fingerprint = check_fingerprint(saved, model_fingerprint(model_or_config), str(path))
    budget = json.loads(metadata["max_bytes"]) if max_bytes is None else max_bytes
    store = cls(max_bytes=budget, block_size=int(metadata["block_size"]), **kwargs)
    store.fingerprint = fingerprint
    device = next(model_or_config.parameters()).device if isinstance(model_or_config, torch.nn.Module) else "cpu"
    _build(store._tree, tensors, fingerprint, str(path), device)
    return store


def _build(tree, tensors: dict, fingerprint: dict, where: str, device) -> None:
    """Rebuild the tree parents first, checking every shape against the fingerprint."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{where} has an inconsistent PrefixStore structure: {why}")

    table, tokens = tensors.get("nodes"), tensors.get("tokens")
    if table is None or tokens is None or table.dim() != 2 or table.shape[1] != 2 or tokens.dim() != 1:
        raise bad("missing or malformed 'nodes'/'tokens' tensors")
    dtype = getattr(torch, fingerprint["dtype"]) if fingerprint.get("dtype") else None
    built, offset, size = [], 0, tree.block_size
    for i, (parent, length) in enumerate(table.tolist()):
        if not -1 <= parent < i or length <= 0 or length % size or offset + length > tokens.numel():
            raise bad(f"node {i} has parent {parent} and length {length} (block size {size})")
        keys, values = tensors.get(f"node{i}.keys"), tensors.get(f"node{i}.values")
        expected = (fingerprint["num_layers"], fingerprint["kv_heads"], length, fingerprint["head_dim"])
        if keys is None or values is None or tuple(keys.shape) != expected or values.shape != keys.shape:
            raise bad(f"node {i} tensors are missing or not of shape {expected}")
        if (dtype is not None and keys.dtype != dtype) or values.dtype != keys.dtype:
            raise bad(f"node {i} holds {keys.dtype}, the model computes {dtype}")
        edge = tuple(tokens[offset : offset + length].tolist())
        offset += length
        parent_node = tree.root if parent < 0 else built[parent]
        if edge[:size] in parent_node.children:
            raise bad(f"node {i} duplicates a sibling's first block")
        keys, values = keys.to(device), values.to(device)
        node = tree.add(parent_node, edge, [(keys[i : i + 1], values[i : i + 1]) for i in range(keys.shape[0])])
        if node is None:
            raise ValueError(f"{where} holds more than max_bytes={tree.max_bytes}; load it with a larger max_bytes")
        built.append(node)
    if offset != tokens.numel():
        raise bad(f"{tokens.numel() - offset} token ids belong to no node")
