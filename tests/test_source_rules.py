"""Rules on the package source itself: nothing unpickles data, and cache code is device-agnostic.

Grep-style checks over ``hf_kvplus/**/*.py``: they fail as soon as a new line breaks a rule, with the
file and line to look at. The allow-lists name each exception and why it is one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import hf_kvplus

PACKAGE = Path(hf_kvplus.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def lines(paths, pattern: str):
    """``(relative path, line number, line)`` of every code line matching ``pattern`` (docstring examples skipped)."""
    regex = re.compile(pattern)
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if regex.search(code) and not code.lstrip().startswith(">>>"):
                found.append((str(path.relative_to(PACKAGE)), number, line.strip()))
    return found


def test_the_rules_see_the_whole_package():
    names = {str(p.relative_to(PACKAGE)) for p in SOURCES}
    assert {"eviction/layer.py", "prefix/io.py", "eval/recipe.py", "attention.py"} <= names


UNSAFE_LOADING = [
    r"\bimport\s+(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\b",
    r"\bfrom\s+(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\b",
    r"\bpickle\.",
    r"\btorch\.load\(",  # even with weights_only=True: prefix-store files are safetensors only
    r"weights_only\s*=\s*False",
    r"allow_pickle\s*=\s*True",
    r"\byaml\.(unsafe_)?load\(",  # yaml.safe_load only
    r"\byaml\.(Unsafe|Full)?Loader\b",
    r"(?<![\w.])(eval|exec)\(",
]


@pytest.mark.parametrize("pattern", UNSAFE_LOADING)
def test_nothing_in_the_package_unpickles_or_evaluates_data(pattern):
    assert lines(SOURCES, pattern) == []


def test_the_prefix_store_reads_and_writes_safetensors_only():
    io = (PACKAGE / "prefix" / "io.py").read_text()
    assert "from safetensors import safe_open" in io and "save_file(" in io
    assert lines([PACKAGE / "prefix" / "io.py"], r"(?<!safe_)open\(|read_bytes\(|read_text\(") == []


# ------------------------------------------------------------------ device-agnostic cache code
CACHE_DIRS = ("caches", "eviction", "storage", "prefix", "quant")  # everything a cache runs
CACHE_CODE = sorted(p for d in CACHE_DIRS for p in (PACKAGE / d).glob("**/*.py")) + [
    PACKAGE / "attention.py", PACKAGE / "hooks.py", PACKAGE / "prefill.py",
]
HOST_ON_PURPOSE = {  # file -> why it names the CPU
    "prefix/cache.py": "token ids are bookkeeping kept on the host (compared with Python lists)",
    "prefix/layer.py": "the same token ids, reordered on the host",
    "prefix/io.py": "files are written from and read into host memory, then moved to the model's device",
    "quant/compiled.py": "the compiled dequantization has only run on CPU so far: other devices take the eager path",
}


def test_cache_code_names_no_device_except_for_host_bookkeeping():
    named = lines(CACHE_CODE, r"""["'](cpu|cuda|mps)(:\d+)?["']|\.(cpu|cuda)\(""")
    unexpected = [hit for hit in named if hit[0] not in HOST_ON_PURPOSE]
    assert unexpected == []
    assert {hit[0] for hit in named} <= set(HOST_ON_PURPOSE)


def test_cache_code_creates_tensors_on_the_device_of_its_inputs():
    """Every ``torch.arange/zeros/ones/empty/full/tensor/...`` call passes ``device=`` (``new_*``/``*_like`` inherit it)."""
    created = lines(CACHE_CODE, r"torch\.(arange|zeros|ones|empty|full|tensor|randn|rand|eye|linspace)\(")
    missing = [hit for hit in created if "device=" not in hit[2]]
    assert [hit[0] for hit in missing] == ["prefix/io.py", "prefix/io.py"]  # the file's index tensors


# What differs between transformers versions, or is private to transformers, is named in _compat.py only.
VERSION_DEPENDENT = [
    r"past_key_values\s*=",  # the cache keyword (renamed to `cache` in 5.24): use _compat.cache_kwargs
    r"[\"']past_key_values[\"']",
    r"\.past_key_values\b",  # output field (`.cache` from 5.24): use _compat.output_cache
    r"\._attn_implementation\b",
    r"\bfrom\s+transformers\.(integrations|masking_utils|modeling_rope_utils|utils)\b",
    r"\bsdpa_attention_forward\b",
    r"\blayer\.dtype\b",  # dropped from CacheLayerMixin in 5.24: use _compat.layer_dtypes
]


@pytest.mark.parametrize("pattern", VERSION_DEPENDENT)
def test_version_dependent_names_live_in_compat_only(pattern):
    outside = [path for path in SOURCES if path.name != "_compat.py"]
    docstring_free = []
    for path, number, line in lines(outside, pattern):
        if line.startswith(("``", "(``", "*")) or "``" in line:  # prose in docstrings, not code
            continue
        docstring_free.append((path, number, line))
    assert docstring_free == []


# ------------------------------------------------------------------ layout: policy x storage, no cycles
def _imports(path: Path) -> set[str]:
    """Modules of hf_kvplus a file imports (relative imports resolved), wherever the import sits."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for dots, rest in re.findall(r"^\s*from (\.+)([\w.]*) import", path.read_text(), flags=re.M):
        base = package[: len(package) - (len(dots) - 1)]
        found.add(".".join([*base, *([rest] if rest else [])]))
    return found


def test_storage_imports_no_cache_code():
    """Storage is the lower axis: quant kernels and leaf helpers only, never eviction, prefix or registry."""
    above = ("hf_kvplus.eviction", "hf_kvplus.prefix", "hf_kvplus.registry", "hf_kvplus.quantized",
             "hf_kvplus.attention", "hf_kvplus.eval")
    bad = {(str(p.relative_to(PACKAGE)), m) for p in (PACKAGE / "storage").glob("*.py") for m in _imports(p)
           if m.startswith(above)}
    assert bad == set()


def test_no_import_cycle_between_modules():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}  # a package's own __init__

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return trail
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for c in (cycle_from(name) for name in graph) if c]
    assert cycles == []


# ------------------------------------------------------------------ no private names across modules
PRIVATE_ON_PURPOSE = {  # (importing module, imported module, name) -> why
}


def private_imports(paths, root: Path = PACKAGE.parent) -> list[tuple[str, str, str]]:
    """``(file, module, name)`` of every ``from hf_kvplus... import _name`` (relative or absolute) in ``paths``.

    ``hf_kvplus._compat`` is the designated home of names private to transformers, so importing it and its
    helpers is allowed; everything else shared between modules must be public (no leading underscore)."""
    found = []
    for path in paths:
        package = list(path.relative_to(root).parts[:-1])  # hf_kvplus/eval/runner.py -> ["hf_kvplus", "eval"]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module != "hf_kvplus" and not module.startswith("hf_kvplus."):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                compat = module == "hf_kvplus._compat" or (module == "hf_kvplus" and alias.name == "_compat")
                if private and not compat:
                    found.append((str(path.relative_to(root / "hf_kvplus")), module, alias.name))
    return found


def test_the_private_import_check_sees_relative_and_absolute_imports(tmp_path):
    probe = tmp_path / "hf_kvplus" / "eval" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from .perplexity import _x, y\nfrom hf_kvplus.registry import _check\nfrom .._compat import _z\n"
                     "from .. import _compat\nfrom ..quant import (\n    __version__,\n    _split,\n)\n")
    assert private_imports([probe], root=tmp_path) == [
        ("eval/probe.py", "hf_kvplus.eval.perplexity", "_x"), ("eval/probe.py", "hf_kvplus.registry", "_check"),
        ("eval/probe.py", "hf_kvplus.quant", "_split")]


def test_no_module_imports_a_private_name_from_another():
    found = [hit for hit in private_imports(SOURCES) if hit not in PRIVATE_ON_PURPOSE]
    assert found == []
    assert set(PRIVATE_ON_PURPOSE) <= set(private_imports(SOURCES))  # an exception no longer needed is removed
