"""Texts to evaluate on: the embedded default, any ``datasets`` dataset, or a local file; tokenized once.

A data spec is what a recipe's ``data:`` entry holds::

    data: default                                    # Python's reference prose, shipped with Python
    data: {dataset: wikitext, config: wikitext-2-raw-v1, split: test, column: text}
    data: {dataset: ./my_saved_dataset}              # a folder written by Dataset.save_to_disk
    data: {dataset: json, data_files: my.jsonl, split: train}   # any datasets builder on local files
    data: {path: notes.txt}                          # or a .jsonl file with one {"text": ...} per line

Token ids are cached on disk under :func:`cache_dir`, keyed by the tokenizer and the data spec.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SOURCES = ("default", "dataset", "file")


@dataclass(frozen=True)
class DataSpec:
    """Where the text comes from.

    Args:
        source (`str`, defaults to ``"default"``): one of ``"default"``, ``"dataset"``, ``"file"``.
        dataset (`str`, *optional*): a ``datasets`` id (``"wikitext"``) or a ``save_to_disk`` folder.
        config (`str`, *optional*): the dataset configuration (``"wikitext-2-raw-v1"``).
        data_files (`str` or `list[str]`, *optional*): files for a builder such as ``"text"`` or ``"json"``.
        split (`str`, defaults to ``"test"``), column (`str`, defaults to ``"text"``): what to read.
        path (`str`, *optional*): a local ``.txt`` file, or ``.jsonl`` with one object per line.
        max_documents (`int`, *optional*): read only the first rows (pg19 books are long).
        streaming (`bool`, defaults to `False`): stream the dataset instead of downloading it whole.

    Example:

    ```python
    >>> spec = DataSpec.parse({"dataset": "wikitext", "config": "wikitext-2-raw-v1"})
    >>> ids = load_token_ids(spec, tokenizer)
    ```
    """

    source: str = "default"
    dataset: str | None = None
    config: str | None = None
    data_files: str | list[str] | None = None
    split: str = "test"
    column: str = "text"
    path: str | None = None
    max_documents: int | None = None
    streaming: bool = False

    @classmethod
    def parse(cls, value) -> DataSpec:
        """A spec from a recipe value: ``"default"``, a file path, or a mapping of the fields above."""
        if value is None or value == "default":
            return cls()
        if isinstance(value, str):
            return cls(source="file", path=value)
        if not isinstance(value, dict):
            raise TypeError(f"data must be 'default', a file path or a mapping, got {type(value).__name__}")
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"unknown data field(s) {unknown}; allowed: {sorted(allowed)}")
        fields = dict(value)
        fields.setdefault("source", "dataset" if "dataset" in fields else "file" if "path" in fields else "default")
        spec = cls(**fields)
        if spec.source not in SOURCES:
            raise ValueError(f"unknown data source {spec.source!r}; choose one of {list(SOURCES)}")
        if spec.source == "dataset" and not spec.dataset:
            raise ValueError("data source 'dataset' needs dataset: <a datasets id or a save_to_disk folder>")
        if spec.source == "file" and not spec.path:
            raise ValueError("data source 'file' needs path: <a .txt or .jsonl file>")
        if spec.max_documents is not None and (not isinstance(spec.max_documents, int) or spec.max_documents < 1):
            raise ValueError(f"max_documents must be a positive integer, got {spec.max_documents!r}")
        return spec

    def local_files(self) -> list[str]:
        """The local paths this spec reads (``path``, ``data_files`` without wildcards or URLs, a saved dataset
        folder), as written in the recipe; a Hub dataset id gives none.

        Example:

        ```python
        >>> DataSpec.parse({"path": "notes.txt"}).local_files()
        ['notes.txt']
        ```"""
        if self.source == "file":
            return [self.path]
        if self.source != "dataset":
            return []
        files = [self.data_files] if isinstance(self.data_files, str) else list(self.data_files or [])
        found = [f for f in files if isinstance(f, str) and "://" not in f and not any(c in f for c in "*?[")]
        if Path(self.dataset).is_dir() or str(self.dataset).startswith((".", "/")):
            found.insert(0, self.dataset)
        return found

    def check_files(self) -> None:
        """Raise ``FileNotFoundError`` naming every local path of :meth:`local_files` that does not exist.

        Example:

        ```python
        >>> DataSpec.parse("missing.txt").check_files()  # before any model loads
        Traceback (most recent call last):
        FileNotFoundError: data file(s) ['missing.txt'] do not exist (relative paths are read from /home/me)
        ```"""
        missing = [f for f in self.local_files() if not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"data file(s) {missing} do not exist (relative paths are read from {Path.cwd()})")

    def describe(self) -> str:
        """One line for tables and cards."""
        if self.source == "default":
            return "default text (Python's pydoc_data.topics)"
        if self.source == "file":
            return f"file {self.path} ({self.column} column)" if self.path.endswith(".jsonl") else f"file {self.path}"
        return f"{self.dataset}" + (f"/{self.config}" if self.config else "") + f" [{self.split}] column {self.column!r}"


def cache_dir() -> Path:
    """``$HF_KVPLUS_CACHE``, else ``$XDG_CACHE_HOME/hf_kvplus`` (``~/.cache/hf_kvplus``).

    Tokenized texts are cached there, keyed by tokenizer and text, so reruns skip tokenization.

    Example:

    ```python
    >>> cache_dir()
    PosixPath('/home/me/.cache/hf_kvplus')
    ```"""
    if os.environ.get("HF_KVPLUS_CACHE"):
        return Path(os.environ["HF_KVPLUS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_kvplus"


def _column(rows, column: str, where: str) -> list[str]:
    names = list(getattr(rows, "column_names", None) or [])
    if names and column not in names:
        raise ValueError(f"{where} has no column {column!r}; its columns are {names}")
    return [row[column] for row in rows]


def _load_dataset_texts(spec: DataSpec) -> list[str]:
    import datasets

    where = f"dataset {spec.dataset!r}"
    if Path(spec.dataset).is_dir() and any((Path(spec.dataset) / f).exists() for f in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(spec.dataset)
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise ValueError(f"{where} has no split {spec.split!r}; its splits are {list(loaded)}")
            loaded = loaded[spec.split]
    else:
        try:
            loaded = datasets.load_dataset(spec.dataset, spec.config, data_files=spec.data_files, split=spec.split,
                                           streaming=spec.streaming)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
            offline = " (HF_HUB_OFFLINE=1: only datasets already in the local cache load)" if os.environ.get(
                "HF_HUB_OFFLINE") == "1" else ""
            raise ValueError(
                f"could not load {where} (config {spec.config!r}, split {spec.split!r}){offline}: {error}. Use a "
                "datasets id, a folder written by Dataset.save_to_disk, or data: {path: file.txt|file.jsonl}"
            ) from error
    if spec.max_documents is not None:
        loaded = loaded.take(spec.max_documents) if spec.streaming else loaded.select(range(min(spec.max_documents, len(loaded))))
    return _column(loaded, spec.column, where)


def _load_file_texts(spec: DataSpec) -> list[str]:
    path = Path(spec.path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {spec.path!r} does not exist")
    if path.suffix != ".jsonl":
        return [path.read_text()]
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if spec.column not in row:
                raise ValueError(f"{spec.path} line {number} has no key {spec.column!r}; its keys are {sorted(row)}")
            texts.append(row[spec.column])
    return texts[: spec.max_documents]


def load_text(spec: DataSpec) -> str:
    """The whole text of a spec, documents joined by blank lines.

    Args:
        spec (`DataSpec`): the default text, a ``datasets`` dataset or a local file.

    Example:

    ```python
    >>> text = load_text(DataSpec(source="file", path="notes.txt"))
    ```"""
    if spec.source == "default":
        from .models import load_default_text

        return load_default_text()
    texts = _load_dataset_texts(spec) if spec.source == "dataset" else _load_file_texts(spec)
    text = "\n\n".join(t.strip() for t in texts if t and t.strip())
    if not text:
        raise ValueError(f"{spec.describe()} holds no text")
    return text


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{len(tokenizer)}"
    return hashlib.sha256(f"{tokenizer.name_or_path}|{described}".encode()).hexdigest()[:16]


def _cache_key(spec: DataSpec, tokenizer) -> str:
    fields = asdict(spec)
    if spec.source == "file" and Path(spec.path).is_file():
        stat = Path(spec.path).resolve().stat()
        fields["file"] = [str(Path(spec.path).resolve()), stat.st_size, stat.st_mtime_ns]
    text = json.dumps(fields, sort_keys=True) + _tokenizer_fingerprint(tokenizer)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_token_ids(spec: DataSpec, tokenizer, cache: bool = True) -> torch.Tensor:
    """Token ids ``[n]`` of the spec's text, read from (or written to) the on-disk cache.

    Args:
        spec (`DataSpec`): the data.
        tokenizer: the model's tokenizer.
        cache (`bool`, defaults to `True`): use ``cache_dir()/tokens``.

    Example:

    ```python
    >>> ids = load_token_ids(DataSpec.parse("default"), load_default_tokenizer())  # [n] LongTensor
    ```
    """
    path = cache_dir() / "tokens" / f"{_cache_key(spec, tokenizer)}.npy"
    if cache and path.is_file():
        return torch.from_numpy(np.load(path).astype(np.int64))
    ids = tokenizer(load_text(spec))["input_ids"]
    array = np.asarray(ids, dtype=np.int32)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(partial, array)
        partial.replace(path)  # atomic: concurrent processes never read half a file
        path.with_suffix(".json").write_text(json.dumps({**asdict(spec), "tokens": len(ids)}, indent=1))
    return torch.from_numpy(array.astype(np.int64))
