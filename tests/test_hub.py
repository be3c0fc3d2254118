"""Publishing a run: the dry run writes exactly what would be uploaded; the upload goes through huggingface_hub."""

from __future__ import annotations

import filecmp

import huggingface_hub
import pytest
import yaml

from hf_kvplus.cli import main
from hf_kvplus.eval import RunFolder, pareto_plot, push_run

ROWS = [
    {"key": "c|dynamic|{}", "experiment": "c", "protocol": "compression", "strategy": "dynamic", "settings": "all tokens",
     "ppl": 9.0, "cache_mib": 90.0, "status": "ok"},
    {"key": "c|sink|1024", "experiment": "c", "protocol": "compression", "strategy": "sink", "settings": "budget=1024",
     "ppl": 10.3, "cache_mib": 45.2, "status": "ok", "budget": 1024},
]
RECIPE = "name: demo-run\nmodel: default\ndata: default\nexperiments: [{name: c}]\n"


@pytest.fixture
def run_dir(tmp_path):
    run = RunFolder(tmp_path / "run")
    for row in ROWS:
        run.append(row)
    run.merge()
    pareto_plot(ROWS, run.path / "pareto.png")
    (run.path / "summary.md").write_text("# demo-run\n\n| strategy | ppl |\n|---|---|\n| sink | 10.3 |\n")
    (run.path / "recipe.yaml").write_text(RECIPE)
    return run.path


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dry_run_writes_the_card_and_the_run_files(run_dir, tmp_path, capsys):
    assert main(["push", str(run_dir), "--repo-id", "me/kvplus-demo", "--dry-run", str(tmp_path / "staged")]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    staged = tmp_path / "staged"
    assert sorted(p.name for p in staged.iterdir()) == [
        "README.md", "pareto.png", "recipe.yaml", "results.csv", "results.jsonl", "summary.md"]
    for name in ("pareto.png", "recipe.yaml", "results.csv", "results.jsonl", "summary.md"):
        assert filecmp.cmp(run_dir / name, staged / name, shallow=False)
    card = (staged / "README.md").read_text()
    meta = front_matter(card)
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "results.csv"}]}]
    assert "kv-cache" in meta["tags"] and "demo-run" in meta["pretty_name"]
    assert "| sink | 10.3 |" in card and "![perplexity against cache memory](pareto.png)" in card
    assert "kvplus push run --repo-id me/kvplus-demo" in card


def test_push_uploads_the_same_files_through_the_hub_api(run_dir, tmp_path, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls["create"] = (repo_id, repo_type, private, exist_ok)
            return f"https://hub.example/datasets/{repo_id}"

        def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
            calls["files"] = {p.name: p.read_bytes() for p in __import__("pathlib").Path(folder_path).iterdir()}
            calls["upload"] = (repo_id, repo_type)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_run(run_dir, "me/kvplus-demo", private=True, token="t")
    assert url.endswith("me/kvplus-demo") and calls["create"] == ("me/kvplus-demo", "dataset", True, True)
    assert calls["upload"] == ("me/kvplus-demo", "dataset") and calls["token"] == "t"
    push_run(run_dir, "me/kvplus-demo", dry_run=tmp_path / "staged")
    assert calls["files"] == {p.name: p.read_bytes() for p in (tmp_path / "staged").iterdir()}


def test_bad_pushes_are_refused(run_dir, tmp_path):
    with pytest.raises(ValueError, match="repo_id must look like 'user/name', got 'kvplus'"):
        push_run(run_dir, "kvplus", dry_run=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"not a finished run folder: missing \['results.csv'"):
        push_run(tmp_path, "me/x", dry_run=tmp_path / "x")


def test_push_without_login_or_network_says_so_and_points_to_dry_run(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(run_dir), "--repo-id", "me/kvplus-demo"]) == 2
    error = capsys.readouterr().err
    assert "not logged in" in error and "huggingface-cli login" in error and "--dry-run" in error
    assert "Traceback" not in error
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_dummy")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")  # the test suite runs with HF_HUB_OFFLINE=1: the upload cannot start
    assert main(["push", str(run_dir), "--repo-id", "me/kvplus-demo"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("kvplus: error: could not upload") and "--dry-run" in error and "\n" == error[-1:]
    assert error.count("\n") == 1  # one line, no traceback


def test_the_card_uploads_the_local_data_files_its_recipe_reads(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("some notes")
    (run_dir / "recipe.yaml").write_text(RECIPE.replace("data: default", "data: {path: texts/notes.txt}"))
    files = push_run(run_dir, "me/kvplus-demo", dry_run=tmp_path / "staged")
    assert (tmp_path / "staged" / "texts" / "notes.txt").read_text() == "some notes" and files
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "`texts/notes.txt`, uploaded here" in card and "--local-dir kvplus-run && cd kvplus-run" in card
    (run_dir / "recipe.yaml").write_text(RECIPE.replace("data: default", "data: {path: /elsewhere/missing.txt}"))
    push_run(run_dir, "me/kvplus-demo", dry_run=tmp_path / "staged2")
    card = (tmp_path / "staged2" / "README.md").read_text()
    assert "Not uploaded" in card and "* `/elsewhere/missing.txt`: an absolute path" in card
