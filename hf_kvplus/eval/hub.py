"""Publish a run folder to the Hugging Face Hub as a dataset repository with a card.

What is uploaded: ``README.md`` (the dataset card: YAML metadata, the summary tables, the plot),
``results.csv`` (the dataset viewer's table), ``results.jsonl``, ``summary.md``, ``pareto.png`` and the
``recipe.yaml`` that produced them, plus the local data files the recipe reads (at the relative paths it names,
so the card's "Reproduce" step finds them; a file that cannot be placed so is named in the card instead).
``dry_run`` writes exactly these files into a folder instead.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from .. import __version__

FILES = ("results.csv", "results.jsonl", "summary.md", "pareto.png", "recipe.yaml")
REQUIRED = ("results.csv", "results.jsonl", "summary.md")


LOGIN_HINT = ("log in with `huggingface-cli login` (or `hf auth login`, or set HF_TOKEN), check the network, or run "
              "with --dry-run DIR to write what would be uploaded into DIR")


def _recipe(run_dir: Path) -> dict:
    if (run_dir / "recipe.yaml").is_file():
        return yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    return {}


def data_files(run_dir: str | Path) -> tuple[list[str], dict[str, str]]:
    """The recipe's local data files: ``(paths to upload, {path: why it is not uploaded})``.

    A relative path inside the working directory is uploaded at that path (``kvplus eval recipe.yaml`` in the
    downloaded repository then reads it); an absolute path, one leaving the folder, a folder, or a file not
    found from the working directory is not.

    Example:

    ```python
    >>> data_files("runs/notes")  # a recipe with data: {path: notes.txt}
    (['notes.txt'], {})
    ```"""
    from .data import DataSpec

    raw = _recipe(Path(run_dir)).get("data", "default")
    try:
        paths = DataSpec.parse(raw).local_files()
    except (TypeError, ValueError):
        return [], {}
    upload, left = [], {}
    for path in paths:
        if Path(path).is_absolute() or ".." in Path(path).parts:
            left[path] = "an absolute path or one outside the working folder: place it there or edit recipe.yaml"
        elif Path(path).is_dir():
            left[path] = "a folder (a saved dataset): not uploaded, bring your own copy"
        elif not Path(path).is_file():
            left[path] = f"not found from {Path.cwd()} when this run was pushed"
        else:
            upload.append(path)
    return upload, left


def dataset_card(run_dir: str | Path, repo_id: str) -> str:
    """The dataset card (``README.md``) for a run folder.

    Args:
        run_dir (`str` or `Path`): a run folder written by ``kvplus eval``.
        repo_id (`str`): the dataset repository the card's "Reproduce" step downloads.

    Example:

    ```python
    >>> print(dataset_card("runs/default", "me/kvplus-default")[:3])
    ---
    ```"""
    from huggingface_hub import DatasetCard, DatasetCardData

    run_dir = Path(run_dir)
    recipe = _recipe(run_dir)
    upload, left = data_files(run_dir)
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
        "## Reproduce", "", "With hf_kvplus installed, from this repository's `recipe.yaml`"
        + (f" and the data file(s) it reads ({', '.join(f'`{p}`' for p in upload)}, uploaded here)" if upload else "")
        + ":", "", "```sh",
        f"huggingface-cli download {repo_id} --repo-type dataset --local-dir kvplus-run && cd kvplus-run",
        "kvplus eval recipe.yaml --out run",
        f"kvplus push run --repo-id {repo_id}", "```", "",
        *(["Not uploaded (the recipe reads them; provide them before running it):", "",
           *[f"* `{p}`: {why}" for p, why in left.items()], ""] if left else []),
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
    plots = [p.name for p in sorted(run_dir.glob("*.png")) if p.name not in FILES]  # a protocol's own (cost.png)
    for name in [*FILES, *plots]:
        if (run_dir / name).is_file():
            written.append(Path(shutil.copy2(run_dir / name, folder / name)))
    for path in data_files(run_dir)[0]:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        written.append(Path(shutil.copy2(path, folder / path)))
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

    Raises:
        ConnectionError: no token, the network or the Hub refused (the message points to ``--dry-run``).
        FileNotFoundError: ``run_dir`` is not a finished run folder.

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
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if token is None and get_token() is None:
        raise ConnectionError(f"not logged in to the Hugging Face Hub: {LOGIN_HINT}")
    failures = (OSError, HfHubHTTPError, *_transport_errors())
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        stage_run(run_dir, staging, repo_id)
        try:
            url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=staging,
                              commit_message=f"hf_kvplus run {Path(run_dir).name}")
        except failures as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            why = ("the Hub refused the token (HTTP 401/403)" if status in (401, 403) else
                   "offline mode is on (HF_HUB_OFFLINE=1)" if "offline" in str(error).lower() else
                   f"the Hub could not be reached ({type(error).__name__})")
            raise ConnectionError(f"could not upload {run_dir} to {repo_id}: {why}; {LOGIN_HINT}") from None
    return str(url)


def _transport_errors() -> tuple:
    """The HTTP client's network errors (httpx in huggingface_hub 1.x and later, requests before)."""
    found = []
    for module, name in (("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)
