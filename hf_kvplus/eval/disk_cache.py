"""Convert once, load from disk after: a folder of ``save_pretrained`` output per source file.

An entry is ``<cache root>/<source stem>-<key>/``: what ``save_pretrained`` wrote (safetensors weights,
config, tokenizer files) plus ``hf_kvplus_entry.json``, a manifest naming every file and its size. The
key is the sha256 of the whole source file (about 0.2 s for the 98 MB embedded GGUF, small beside a
load, and unlike size + mtime it changes whenever the content does) mixed with the versions of
transformers and gguf, whose code does the conversion. An entry is written into a temporary folder
beside it and renamed into place, so a reader never sees a half-written one; a missing manifest, a
missing file or a file of another size marks an entry as broken, and it is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ENV_DIR = "HF_KVPLUS_CACHE_DIR"  # where entries live
ENV_SWITCH = "HF_KVPLUS_DISK_CACHE"  # "0"/"false"/"off" bypasses the cache
MANIFEST = "hf_kvplus_entry.json"
FORMAT = 1
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
_STALE_S = 3600  # temporary folders older than this were left by a killed writer


def cache_root() -> Path:
    """``$HF_KVPLUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/hf_kvplus``, else ``~/.cache/hf_kvplus``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "hf_kvplus"


def cache_enabled(disk_cache: bool | None = None) -> bool:
    """``disk_cache`` when given, else ``$HF_KVPLUS_DISK_CACHE`` (on unless ``0``/``false``/``off``/``no``).

    Raises:
        ValueError: the variable holds anything else."""
    if disk_cache is not None:
        return bool(disk_cache)
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"{ENV_SWITCH}={value!r}; use one of {_ON + _OFF}")
    return value in _ON


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def entry_path(source: Path, root: Path | None = None) -> Path:
    """The entry folder for ``source`` (it may not exist yet); reads the whole file once to hash it."""
    digest = hashlib.sha256(
        f"format {FORMAT}; transformers {_version('transformers')}; gguf {_version('gguf')}\n".encode()
    )
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return (root or cache_root()) / f"{Path(source).stem}-{digest.hexdigest()[:16]}"


def entry_valid(entry: Path) -> bool:
    """Whether ``entry`` holds a manifest and every file it names, at the size it names."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        return manifest["format"] == FORMAT and all(
            (entry / n).stat().st_size == size for n, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_entry(entry: Path) -> None:
    """Remove ``entry``: renamed aside first (one atomic step), so no reader sees it half deleted."""
    if not entry.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=".trash-", dir=entry.parent))
    os.replace(entry, aside / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


def write_entry(entry: Path, objects: Sequence) -> Path:
    """Save ``objects`` (anything with ``save_pretrained``) into ``entry``, atomically.

    Written into ``<root>/.tmp-*`` and renamed into place with its manifest; when another process
    finished the same entry first, its folder is kept and ours discarded. Temporary folders older
    than an hour (left by a killed writer) are removed on the way.

    Returns:
        `Path`: ``entry``, now valid."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    for stale in entry.parent.glob(".t*-*"):
        if stale.name.startswith((".tmp-", ".trash-")) and time.time() - stale.stat().st_mtime > _STALE_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
        if entry.exists() and not entry_valid(entry):
            remove_entry(entry)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process renamed its own copy into place first
            if not entry_valid(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


class PlainWeights:
    """A model's weights as one ``model.safetensors``, with its config and generation config.

    ``save_pretrained`` refuses a model loaded from GGUF (transformers attaches a GGUF quantizer to it,
    marked not serializable, even when every weight was de-quantized into a plain tensor); this writes
    the same files from public pieces: the state dict (a tensor tied to an earlier one, such as a tied
    ``lm_head``, is left out, as ``save_pretrained`` does, and re-tied on load) and the config without
    its ``quantization_config``.

    Args:
        model (`PreTrainedModel`): a model whose state dict holds plain floating tensors.

    Raises:
        ValueError: a tensor in the state dict is not floating point (weights still packed)."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, folder) -> None:
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for name, tensor in self.model.state_dict().items():
            if not tensor.is_floating_point():
                raise ValueError(f"{name} holds {tensor.dtype}: only de-quantized weights can be cached")
            ident = (tensor.data_ptr(), tuple(tensor.shape))
            if ident not in seen:
                seen.add(ident)
                tensors[name] = tensor.contiguous()
        save_file(tensors, Path(folder) / "model.safetensors", metadata={"format": "pt"})
        config = self.model.config.to_dict()
        config.pop("quantization_config", None)
        type(self.model.config).from_dict(config).save_pretrained(folder)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(folder)


def load_or_convert(
    source: Path,
    convert: Callable[[], Sequence],
    load: Callable[[Path], object],
    root: Path | None = None,
    reload: bool = False,
):
    """``load(entry)`` when ``source`` has a valid entry; else ``convert()``, saved as the entry.

    Args:
        source (`Path`): the file the entry stands for (its content is the key).
        convert (`Callable`): returns the objects to save, the one to return first (model, tokenizer).
        load (`Callable`): loads the object from an entry folder.
        root (`Path`, *optional*): the cache folder, defaults to :func:`cache_root`.
        reload (`bool`, defaults to ``False``): after converting, return ``load(entry)`` rather than the
            converted object (when ``load`` applies options the conversion did not, such as a dtype).

    Returns:
        the loaded or converted object. An entry that fails to load (``OSError`` or a safetensors error:
        a damaged file of the right size) is removed and rebuilt."""
    from safetensors import SafetensorError

    entry = entry_path(source, root)
    if entry_valid(entry):
        try:
            return load(entry)
        except (OSError, SafetensorError):
            remove_entry(entry)
    converted = convert()
    write_entry(entry, converted)
    return load(entry) if reload else converted[0]
