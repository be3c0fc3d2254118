"""Rows (lists of dicts) as GitHub Markdown tables (a leaf module: protocols and reports both use it)."""

from __future__ import annotations

import math


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (``columns`` default to the keys of the first row).

    Args:
        rows (`list[dict]`): one dict per row; missing values are left blank.
        columns (`list[str]`, *optional*): the columns, in order.

    Example:

    ```python
    >>> print(markdown_table([{"strategy": "sink", "ppl": 11.41}]))
    | strategy | ppl |
    |---|---|
    | sink | 11.41 |
    ```"""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"
