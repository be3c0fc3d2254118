"""The README and docs as a new user reads them: on GitHub (no raw snippet markers), commands that parse, and the
first example running offline on the embedded model."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hf_kvplus.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_generated_blocks_match_their_files_and_no_raw_snippet_marker_is_left():
    done = subprocess.run([sys.executable, "docs/inline_snippets.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    for page in PAGES:
        assert '--8<-- "' not in page.read_text(), f"{page} shows a raw snippet marker on GitHub"


def kvplus_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:sh|bash)\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                line = re.split(r"\s+#|\s>|\s&&", line)[0].strip()
                if line.startswith("kvplus "):
                    found.append((page.name, line))
    return found


@pytest.mark.parametrize("page, line", kvplus_commands())
def test_every_documented_kvplus_command_parses(page, line):
    argv = [a for a in shlex.split(line)[1:] if a != "..."]
    try:
        build_parser().parse_args(argv)
    except SystemExit as error:  # argparse exits on a bad command line
        pytest.fail(f"{page}: `{line}` does not parse ({error})")


def test_the_documented_cli_forms_exist():
    lines = [line for _, line in kvplus_commands()]
    for form in ("kvplus generate ", "kvplus bench ", "--random-weights", "--compare", "--context 128k"):
        assert any(form in line for line in lines), form
    readme = (ROOT / "README.md").read_text()
    assert "make docs" in readme and "mkdocs" in readme and "kvplus bench" in readme.split("## On a GPU")[1]
    assert "results.jsonl" in (ROOT / "docs" / "quickstart.md").read_text()


@pytest.mark.integration
def test_the_readme_first_example_runs_offline_on_the_embedded_model():
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    assert "from_pretrained" not in block  # the Hub variant sits beside it, not in it
    namespace: dict = {}
    assert "max_new_tokens=128" in block
    quick = block.replace("max_new_tokens=128", "max_new_tokens=72")  # still past the budget of 64: it evicts
    exec(compile(quick, "README block 1", "exec"), namespace)
    assert namespace["cache"].max_held <= 64
