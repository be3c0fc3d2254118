"""Every public name documents itself in the transformers style: a summary, ``Args:`` when it takes
arguments, and one ``Example:``."""

from __future__ import annotations

import inspect

import pytest

import hf_kvplus
import hf_kvplus.bench
import hf_kvplus.eval


def public_names():
    for module in (hf_kvplus, hf_kvplus.eval, hf_kvplus.bench):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj


def arguments(obj) -> list[str]:
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in parameters if name not in ("self", "args", "kwargs")]


@pytest.mark.parametrize(("name", "obj"), list(public_names()), ids=lambda value: value if isinstance(value, str) else "")
def test_public_name_has_args_and_an_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    if arguments(obj):
        assert "Args:" in doc or "Attributes:" in doc, f"{name} takes {arguments(obj)} but documents no Args:"
    assert "Example" in doc, f"{name} has no Example:"
