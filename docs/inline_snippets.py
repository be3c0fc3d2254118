"""Copy generated result files into the docs pages that show them, so the pages read the same on GitHub and on the site.

A page marks a generated block with HTML comments (invisible on both)::

    <!-- snippet: benchmarks/results/long_stream.md -->
    ...the file's text, refreshed by this script...
    <!-- end snippet -->

A ``.txt`` file is shown in a ``text`` code block. A legacy ``--8<-- "path"`` line (pymdownx.snippets, which GitHub
shows raw) is converted to a marked block, code fence included. Run from the repository root after a benchmark or
``docs/publish_run.py`` rewrote a result file::

    python docs/inline_snippets.py           # refresh every page
    python docs/inline_snippets.py --check   # exit 1 and name the stale pages (tests/test_docs_pages.py runs this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"<!-- snippet: (?P<path>\S+) -->\n.*?<!-- end snippet -->", re.S)
LEGACY = re.compile(r'(?:```\w*\n)?--8<-- "(?P<path>[^"]+)"\n(?:```\n)?')


def block(path: str) -> str:
    """The marked block showing ``path`` (a repository-relative file) as it is now."""
    text = (ROOT / path).read_text().strip("\n")
    body = f"```text\n{text}\n```" if path.endswith(".txt") else text
    return f"<!-- snippet: {path} -->\n{body}\n<!-- end snippet -->"


def render(page_text: str) -> str:
    """``page_text`` with every marked block refreshed and every legacy snippet line converted."""
    page_text = LEGACY.sub(lambda m: block(m["path"]) + "\n", page_text)
    return BLOCK.sub(lambda m: block(m["path"]), page_text)


def stale_pages() -> list[str]:
    """Pages whose blocks differ from their files (or that still hold a legacy snippet line)."""
    return [page for page in PAGES if render((ROOT / page).read_text()) != (ROOT / page).read_text()]


def main(argv: list[str]) -> int:
    stale = stale_pages()
    if "--check" in argv:
        if stale:
            print(f"stale generated blocks in {stale}: run python docs/inline_snippets.py", file=sys.stderr)
        return 1 if stale else 0
    for page in stale:
        (ROOT / page).write_text(render((ROOT / page).read_text()))
        print(f"refreshed {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
