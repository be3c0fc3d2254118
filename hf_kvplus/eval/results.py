"""The run folder: rows written point by point (JSONL, then CSV), so a stopped sweep resumes.

Files in a run folder:

* ``results.jsonl``: one JSON object per grid point (full detail, including per-window curves);
* ``results.csv``: the same rows, scalar columns only; always ``strategy``, ``ppl`` and ``cache_mib``;
* ``results.rank{N}.jsonl``: rows of process ``N`` while ``accelerate launch`` runs, merged at the end.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

FIRST_COLUMNS = [
    "experiment", "protocol", "strategy", "settings", "status", "ppl", "ppl_vs_dense", "cache_mib", "cache_mib_peak",
    "memory_saved", "decode_tok_s", "budget", "keep_ratio",
]


def read_rows(path: str | Path) -> list[dict]:
    """Rows of one JSONL file (a line cut short by an interrupt is ignored)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def add_dense_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``ppl_vs_dense`` and ``memory_saved`` from the ``dynamic`` row of the same experiment."""
    dense = {r["experiment"]: r for r in rows if r.get("strategy") == "dynamic" and r.get("status") == "ok"}
    for row in rows:
        ref = dense.get(row.get("experiment"))
        ok = ref is not None and row.get("status") == "ok" and row.get("ppl") is not None
        row["ppl_vs_dense"] = row["ppl"] / ref["ppl"] if ok and ref["ppl"] else None
        row["memory_saved"] = 1 - row["cache_mib"] / ref["cache_mib"] if ok and ref["cache_mib"] else None
    return rows


class RunFolder:
    """Reads and writes one run folder.

    Args:
        path (`str` or `Path`): the folder (created if missing).
        rank (`int`, defaults to 0), world_size (`int`, defaults to 1): this process among ``accelerate`` processes.

    Example:

    ```python
    >>> run = RunFolder("runs/default")
    >>> done = run.done_keys()  # grid points already measured
    >>> run.append({"key": "...", "strategy": "sink", "ppl": 10.3, "cache_mib": 45.2, "status": "ok"})
    ```
    """

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank, world_size
        self.jsonl = self.path / "results.jsonl"
        self.csv = self.path / "results.csv"
        self.own = self.jsonl if world_size == 1 else self.path / f"results.rank{rank}.jsonl"

    def all_rows(self) -> list[dict]:
        """Every row written so far by any process, the latest row of each grid point only."""
        latest = {}
        for part in [self.jsonl, *sorted(self.path.glob("results.rank*.jsonl"))]:
            for row in read_rows(part):
                latest[row.get("key")] = row
        return list(latest.values())

    def done_keys(self, fingerprints: dict[str, str] | None = None) -> set[str]:
        """Keys of points measured successfully (with the same settings fingerprint, when given)."""
        done = set()
        for row in self.all_rows():
            if row.get("status") != "ok":
                continue
            if fingerprints is not None and fingerprints.get(row["key"]) != row.get("fingerprint"):
                continue
            done.add(row["key"])
        return done

    def append(self, row: dict) -> None:
        """Add one row durably; a single process also refreshes the CSV."""
        with open(self.own, "a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.world_size == 1:
            write_csv(self.csv, add_dense_ratios(self.all_rows()))

    def merge(self, order: list[str] | None = None) -> list[dict]:
        """Gather every process's rows into ``results.jsonl`` / ``results.csv`` (in grid ``order``)."""
        rows = self.all_rows()
        if order is not None:
            rank = {key: i for i, key in enumerate(order)}
            rows.sort(key=lambda r: rank.get(r.get("key"), len(rank)))
        rows = add_dense_ratios(rows)
        partial = self.jsonl.with_suffix(".jsonl.tmp")
        partial.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
        partial.replace(self.jsonl)
        for part in self.path.glob("results.rank*.jsonl"):
            part.unlink()
        write_csv(self.csv, rows)
        return rows


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Scalar fields of ``rows`` as CSV, the columns in :data:`FIRST_COLUMNS` first."""
    columns = list(FIRST_COLUMNS)
    for row in rows:
        for key, value in row.items():
            if key not in columns and not isinstance(value, (list, dict)):
                columns.append(key)
    path = Path(path)
    partial = path.with_suffix(".csv.tmp")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)
    return path
