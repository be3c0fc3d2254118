"""Copy the eviction benchmarks' tables into ``docs/strategies/heavy_hitter.md``.

Each ``<!-- NAME:start -->`` ... ``<!-- NAME:end -->`` block of the page is replaced by the table of
``benchmarks/results/eviction_NAME.md`` (its title line dropped), so the page shows exactly what the
scripts printed::

    PYTHONPATH=. python benchmarks/render_eviction_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "strategies" / "heavy_hitter.md"
BLOCKS = ("compression", "streaming", "decode_speed")


def table(name: str) -> str:
    """The results Markdown of ``eviction_<name>`` without its ``#`` title."""
    lines = (ROOT / "benchmarks" / "results" / f"eviction_{name}.md").read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("# ")).strip()


def render(page: str) -> str:
    """``page`` with every known block replaced by its current table."""
    for name in BLOCKS:
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(page):
            raise ValueError(f"{PAGE} has no <!-- {name}:start --> ... <!-- {name}:end --> block")
        page = pattern.sub(lambda m, n=name: m.group(1) + table(n) + "\n" + m.group(2), page)
    return page


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text()))
    print(f"rendered {', '.join(BLOCKS)} into {PAGE.relative_to(ROOT)}")
