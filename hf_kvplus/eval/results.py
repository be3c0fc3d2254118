"""The run folder: rows written point by point (JSONL, then CSV), so a stopped sweep resumes.

Files in a run folder:

* ``results.jsonl``: one JSON object per row (full detail, including per-window curves); a grid point has one
  row, or several (``part`` 0 .. ``parts`` - 1) for protocols such as ``cost_of_caching`` (one per length);
* ``results.csv``: the same rows, scalar columns only: the point's columns, then the metric columns of the
  protocols that ran (their ``metrics`` schema, in order), then the rest;
* ``results.rank{N}.jsonl``: rows of process ``N`` while ``accelerate launch`` runs, merged at the end.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

FIRST_COLUMNS = ["experiment", "protocol", "strategy", "settings", "status"]
POINT_COLUMNS = ["budget", "keep_ratio", "peak_rss_mib", "device_peak_mib", "seconds"]


def _protocol(row: dict):
    from .protocols import PROTOCOLS

    return PROTOCOLS.get(row.get("protocol"))


def metric_columns(rows: list[dict]) -> list[str]:
    """The metric columns of the protocols of ``rows``, in schema order (``ppl``, ``ppl_vs_dense``, ``cache_mib``...)."""
    columns = []
    for name in dict.fromkeys(r.get("protocol") for r in rows):
        protocol = _protocol({"protocol": name})
        for metric in protocol.metrics if protocol else ():
            if metric.column not in columns:
                columns.append(metric.column)
    return columns


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
    """Fill ``ppl_vs_dense`` and ``memory_saved`` from the ``dynamic`` row of the same experiment.

    The compared columns are the protocol's ``quality`` and ``memory`` (``ppl`` and ``cache_mib`` for the
    perplexity protocols, and for rows that name no registered protocol); rows of protocols without them
    (``cost_of_caching``, ``prompt_order``) get no ratios."""
    dense = {r["experiment"]: r for r in rows if r.get("strategy") == "dynamic" and r.get("status") == "ok"}
    for row in rows:
        protocol = _protocol(row)
        quality, memory = (protocol.quality, protocol.memory) if protocol else ("ppl", "cache_mib")
        if quality is None:
            continue
        ref = dense.get(row.get("experiment"))
        ok = ref is not None and row.get("status") == "ok" and row.get(quality) is not None
        row["ppl_vs_dense"] = row[quality] / ref[quality] if ok and ref[quality] else None
        row["memory_saved"] = 1 - row[memory] / ref[memory] if ok and memory and ref.get(memory) else None
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

    def points(self) -> dict[str, list[dict]]:
        """``{key: rows}``: the rows of the latest measurement of each grid point written by any process."""
        latest: dict[str, list[dict]] = {}
        for part in [self.jsonl, *sorted(self.path.glob("results.rank*.jsonl"))]:
            for row in read_rows(part):
                key = row.get("key")
                if row.get("part", 0) == 0 or key not in latest:  # part 0 opens a new measurement of the point
                    latest[key] = [row]
                else:
                    latest[key].append(row)
        return latest

    def all_rows(self) -> list[dict]:
        """Every row written so far by any process, the latest measurement of each grid point only."""
        return [row for rows in self.points().values() for row in rows]

    def done_keys(self, fingerprints: dict[str, str] | None = None) -> set[str]:
        """Keys of points measured successfully, all their rows there (with the same fingerprint, when given)."""
        done = set()
        for key, rows in self.points().items():
            if len(rows) != rows[0].get("parts", 1) or any(row.get("status") != "ok" for row in rows):
                continue  # an error, or a point cut short between its rows
            if fingerprints is not None and fingerprints.get(key) != rows[0].get("fingerprint"):
                continue
            done.add(key)
        return done

    def append(self, row: dict) -> None:
        """Add one row (a grid point's only row) durably; a single process also refreshes the CSV."""
        self.append_point([row])

    def append_point(self, rows: list[dict]) -> None:
        """Add the rows of one grid point durably (numbered ``part`` of ``parts`` when there are several)."""
        if len(rows) > 1:
            rows = [{**row, "part": i, "parts": len(rows)} for i, row in enumerate(rows)]
        with open(self.own, "a") as handle:
            handle.write("".join(json.dumps(row, default=str) + "\n" for row in rows))
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
    """Scalar fields of ``rows`` as CSV: :data:`FIRST_COLUMNS`, the protocols' metric columns, the point's, the rest."""
    present = {key for row in rows for key in row}
    columns = list(FIRST_COLUMNS) + [c for c in metric_columns(rows) + POINT_COLUMNS if c in present]
    columns = list(dict.fromkeys(columns))
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
