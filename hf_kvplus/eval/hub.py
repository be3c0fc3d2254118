"""Publish a run folder to the Hugging Face Hub as a dataset repository with a card.

What is uploaded: ``README.md`` (the dataset card: YAML metadata, the summary tables, the plot),
``results.csv`` (the dataset viewer's table), ``results.jsonl``, ``summary.md``, ``pareto.png`` and the
``recipe.yaml`` that produced them. ``dry_run`` writes exactly these files into a folder instead.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from .. import __version__

FILES = ("results.csv", "results.jsonl", "summary.md", "pareto.png", "recipe.yaml")
REQUIRED = ("results.csv", "results.jsonl", "summary.md")


def dataset_card(run_dir: str | Path, repo_id: str) -> str:
    """The dataset card (``README.md``) for a run folder."""
    from huggingface_hub import DatasetCard, DatasetCardData

    run_dir = Path(run_dir)
    recipe = {}
    if (run_dir / "recipe.yaml").is_file():
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    name = recipe.get("name") or run_dir.name
    model = recipe.get("model", "default")
    model_id = model.get("id", "default") if isinstance(model, dict) else model
    data = DatasetCardData(
        pretty_name=f"hf_kvplus {name}: perplexity against KV cache memory",
        tags=["hf_kvplus", "kv-cache", "perplexity", "benchmark"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "results.csv"}]}],
    )
    summary = (run_dir / "summary.md").read_text()
    summary = summary.split("\n", 1)[1] if summary.startswith("# ") else summary  # the card has its own title
    body = "\n".join([
        "---", data.to_yaml(), "---", "",
        f"# {name}: perplexity against KV cache memory", "",
        f"Measured with hf_kvplus {__version__} (`kvplus eval recipe.yaml`); "
        f"model `{model_id}`. Each row of `results.csv` is one grid point: a cache strategy and its settings "
        "(`strategy`, `settings`), the perplexity it scores (`ppl`) and the KV cache memory it holds (`cache_mib`).",
        "", summary.replace("![perplexity against cache memory](pareto.png)", ""), "",
        "![perplexity against cache memory](pareto.png)" if (run_dir / "pareto.png").is_file() else "", "",
        "## Reproduce", "", "With hf_kvplus installed, from this repository's `recipe.yaml`:", "", "```sh",
        "kvplus eval recipe.yaml --out run",
        f"kvplus push run --repo-id {repo_id}", "```", "",
    ])
    return str(DatasetCard(body))


def stage_run(run_dir: str | Path, folder: str | Path, repo_id: str) -> list[Path]:
    """Write exactly what :func:`push_run` uploads into ``folder``; return the files.

    Args:
        run_dir (`str` or `Path`): a run folder written by ``kvplus eval``.
        folder (`str` or `Path`): where to write the staged files.
        repo_id (`str`): the dataset repository named in the card.

    Example:

    ```python
    >>> files = stage_run("runs/default", "staged", "me/kvplus-default")
    >>> sorted(f.name for f in files)[:2]
    ```"""
    run_dir, folder = Path(run_dir), Path(folder)
    missing = [f for f in REQUIRED if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished run folder: missing {missing} (run kvplus eval first)")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FILES:
        if (run_dir / name).is_file():
            written.append(Path(shutil.copy2(run_dir / name, folder / name)))
    (folder / "README.md").write_text(dataset_card(run_dir, repo_id))
    return [folder / "README.md", *written]


def push_run(run_dir: str | Path, repo_id: str, dry_run: str | Path | None = None, private: bool = False,
             token: str | None = None) -> str:
    """Upload a run folder to the Hub as the dataset ``repo_id`` (or, with ``dry_run``, stage it locally).

    Args:
        run_dir (`str` or `Path`): a folder written by ``kvplus eval``.
        repo_id (`str`): ``"user/name"`` of the dataset repository (created if missing).
        dry_run (`str` or `Path`, *optional*): write the files into this folder and upload nothing.
        private (`bool`, defaults to `False`): create the repository as private.
        token (`str`, *optional*): a Hub token; by default the one ``huggingface-cli login`` saved.

    Returns:
        `str`: the repository URL, or the dry-run folder.

    Example:

    ```python
    >>> push_run("runs/default", "me/kvplus-default", dry_run="runs/default-hub")
    'runs/default-hub'
    ```
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    if dry_run is not None:
        stage_run(run_dir, dry_run, repo_id)
        return str(dry_run)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        stage_run(run_dir, staging, repo_id)
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=staging,
                          commit_message=f"hf_kvplus run {Path(run_dir).name}")
    return str(url)
