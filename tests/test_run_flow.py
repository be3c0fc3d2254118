"""A run's flow: bad data fails before the model loads, and a finished run reports what it reused without one."""

from __future__ import annotations

import pytest
from test_runner import SMALL, tiny_dir, token_cache, write_recipe  # noqa: F401 - fixtures used by name

from hf_kvplus.cli import main
from hf_kvplus.eval import load_recipe, models, run_recipe


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_a_missing_data_file_fails_before_the_model_loads(tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    path = write_recipe(tmp_path, tiny_dir, data={"path": str(tmp_path / "missing.txt")}, experiments=SMALL)
    monkeypatch.setattr(models, "load_model_and_tokenizer", no_model)
    with pytest.raises(FileNotFoundError, match=r"data file\(s\) \['.*missing.txt'\] do not exist"):
        run_recipe(load_recipe(path), out=tmp_path / "run", progress=False)


def test_a_finished_run_reports_what_it_reused_without_loading_the_model(tmp_path, tiny_dir, monkeypatch,  # noqa: F811
                                                                         capsys):
    path = write_recipe(tmp_path, tiny_dir, experiments=SMALL)
    first = run_recipe(load_recipe(path), out=tmp_path / "run", progress=False)
    assert first["measured"] == 2 and first["reused"] == 0
    summary = (tmp_path / "run" / "summary.md").read_text()
    monkeypatch.setattr(models, "load_model_and_tokenizer", no_model)
    assert main(["eval", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reused 2 finished grid point(s)" in out and "measured 0 (no model loaded)" in out
    assert (tmp_path / "run" / "summary.md").read_text() == summary
    assert "peak RSS MiB" in summary  # CPU runs show the process's peak memory
