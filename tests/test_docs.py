"""Every Python block of the quickstart and of the walkthrough runs, in order, as a reader would run it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hf_kvplus
from hf_kvplus import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def run_page(page: str) -> dict:
    namespace: dict = {"__name__": f"docs_{page.replace('/', '_').removesuffix('.md')}"}
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{page} block {number}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message says which block failed
            raise AssertionError(f"{page}, python block {number} failed: {error!r}\n{block}") from error
    return namespace


def test_write_your_own_cache_walkthrough_runs():
    try:
        namespace = run_page("write_your_own_cache.md")
        cache = namespace["cache"]
        assert type(cache).__name__ == "ValueNormCache"
        assert "value_norm" in hf_kvplus.list_caches()
        layer = cache.layers[0]
        # the kept tokens are the sinks, the recent window and the largest-value tokens of the rest
        assert layer.kept == 24 and layer.pos.shape[-1] == 24
        code_lines = [line for block in python_blocks("write_your_own_cache.md")[:3] for line in block.splitlines()
                      if line.strip() and not line.strip().startswith(("#", '"""'))]
        assert len(code_lines) <= 35, f"the walkthrough's strategy takes {len(code_lines)} lines"
    finally:
        registry._REGISTRY.pop("value_norm", None)


@pytest.mark.integration
def test_quickstart_runs_on_the_embedded_model():
    namespace = run_page("quickstart.md")
    assert namespace["cache"].max_held <= 64


def test_site_builds_without_warnings(tmp_path):
    """The documentation site builds in strict mode: broken links, missing generated tables or
    malformed docstrings fail the suite."""
    import os
    import subprocess
    import sys

    root = DOCS.parent
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=root, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "write_your_own_cache" / "index.html").exists()
