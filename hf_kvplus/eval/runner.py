"""Run a recipe: every grid point of every experiment, one row each, into a resumable run folder.

Under ``accelerate launch`` the grid points are dealt round-robin to the processes; each writes its own
rows and the main process gathers one result set, the plot and the summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..hooks import detach
from ..memory import peak_memory, reset_peak_memory
from ..registry import get_spec, make_cache
from .data import load_token_ids
from .grid import Point, expand_grid
from .perplexity import MIB, _progress
from .protocols import PROTOCOLS
from .results import RunFolder


class _Processes:
    """This process among the processes ``accelerate launch`` (or ``torchrun``) started; one process without it.

    On CPU the processes talk through gloo (``PartialState(cpu=True)``); on CUDA each takes its own GPU.
    """

    def __init__(self, device: str = "cpu"):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not (str(device).startswith("cuda") and torch.cuda.is_available()))
        self.rank = self.state.process_index if self.state else 0
        self.world_size = self.state.num_processes if self.state else 1
        self.device = str(self.state.device) if self.state and str(device) == "cuda" else device

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def fingerprint(recipe, point: Point) -> str:
    """Hash of everything that changes a point's result besides its key (model, data, protocol options)."""
    text = json.dumps([recipe.model, asdict(recipe.data), point.options, point.cache_kwargs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _base_row(recipe, point: Point, rank: int) -> dict:
    row = {"key": point.key, "fingerprint": fingerprint(recipe, point), "experiment": point.experiment,
           "protocol": next(e.protocol for e in recipe.experiments if e.name == point.experiment),
           "strategy": point.strategy, "settings": point.settings, **point.params}
    if "budget" in point.cache_kwargs:
        row["budget"] = point.cache_kwargs["budget"]
    return {**row, "rank": rank}


def check_point(model, point: Point) -> str | None:
    """``None`` if the point's cache builds on this model, else why not (strategy's own error message)."""
    try:
        make_cache(point.strategy, model.config, **point.cache_kwargs)
    except (ValueError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def run_point(model, tokenizer, ids, protocol: str, point: Point, progress: bool = False) -> dict:
    """Measure one grid point: the protocol's metrics plus memory (cache MiB, peak RSS / CUDA) and time.

    Args:
        model (`PreTrainedModel`): the model.
        tokenizer: its tokenizer (the passkey protocol writes prompts).
        ids (`torch.Tensor`): ``[tokens]`` token ids of the text.
        protocol (`str`): ``"compression"``, ``"streaming"`` or ``"passkey"``.
        point (`Point`): the grid point to run.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Example:

    ```python
    >>> point = expand_grid(recipe.experiments[0])[0][1]
    >>> run_point(model, tokenizer, ids, "compression", point)["ppl"]
    ```
    """
    reset_peak_memory(model.device)
    started = time.perf_counter()
    try:
        metrics = PROTOCOLS[protocol].run(
            model, tokenizer, ids, lambda: make_cache(point.strategy, model, **point.cache_kwargs), point.options,
            progress=progress,
        )
    finally:
        if get_spec(point.strategy).attention_scores:
            detach(model)  # hooks removed, so the next strategies run (and are timed) without them
    peaks = peak_memory(model.device)
    row = {key: value for key, value in metrics.items() if not key.startswith("cache_bytes")}
    row["cache_mib"] = metrics["cache_bytes"] / MIB
    row["cache_mib_peak"] = metrics["cache_bytes_peak"] / MIB
    if "window_cache_bytes" in row:
        row["window_cache_mib"] = [b / MIB for b in row.pop("window_cache_bytes")]
    if point.strategy == "dynamic" and "exact" in row:
        row["exact"] = True  # a dense cache never evicts: chunked streaming scores exactly the same tokens
    row["peak_rss_mib"] = peaks["peak_rss_bytes"] / MIB
    row["device_peak_mib"] = None if peaks["device_peak_bytes"] is None else peaks["device_peak_bytes"] / MIB
    row["seconds"] = time.perf_counter() - started
    return row


def run_recipe(recipe, out: str | Path | None = None, progress: bool = True, model=None, tokenizer=None,
               ids=None, device: str | None = None, dtype: str | None = None, threads: int | None = None) -> dict:
    """Run every grid point not already in the run folder; return the gathered rows (main process).

    Args:
        recipe (`Recipe`): from :func:`hf_kvplus.eval.load_recipe`.
        out (`str` or `Path`, *optional*): the run folder; defaults to ``runs/<recipe name>``.
        progress (`bool`, defaults to `True`): progress bars.
        model, tokenizer (*optional*): already loaded; otherwise loaded from ``recipe.model``.
        ids (`torch.LongTensor`, *optional*): the token ids; otherwise from ``recipe.data`` (cached on disk).
        device (`str`, *optional*), dtype (`str`, *optional*): override the recipe's model device / dtype.
        threads (`int`, *optional*): CPU threads for torch (overrides the recipe's ``model.threads``); one thread
            per process avoids the stalls two OpenMP threads suffer on a machine busy with other work.

    Returns:
        `dict`: ``rows`` (every grid point, in grid order; empty on processes other than the main one),
        ``excluded`` (strategies the recipe leaves out, with reasons), ``folder``, ``seconds``, ``reused`` (points
        already in the folder) and ``measured`` (points this process ran). When every point is already there, no
        model is loaded. A local data file that does not exist raises ``FileNotFoundError`` before the model loads.

    Example:

    ```python
    >>> from hf_kvplus.eval import load_recipe, run_recipe
    >>> result = run_recipe(load_recipe("default"), out="runs/default")
    >>> [(r["strategy"], r["settings"], r["ppl"], r["cache_mib"]) for r in result["rows"]]
    ```
    """
    threads = threads or recipe.model.get("threads")
    if not threads:
        return _run(recipe, out, progress, model, tokenizer, ids, device, dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(recipe, out, progress, model, tokenizer, ids, device, dtype)
    finally:
        torch.set_num_threads(previous)


def _run(recipe, out, progress, model, tokenizer, ids, device, dtype) -> dict:
    started = time.perf_counter()
    spec = {**recipe.model, **({"device": device} if device else {}), **({"dtype": dtype} if dtype else {})}
    processes = _Processes(spec["device"])
    folder = RunFolder(out or Path("runs") / recipe.name, processes.rank, processes.world_size)
    expanded = [expand_grid(e) for e in recipe.experiments]
    points = [p for pts, _ in expanded for p in pts]
    excluded = [x for _, xs in expanded for x in xs]
    if processes.rank == 0 and recipe.text:
        (folder.path / "recipe.yaml").write_text(recipe.text)
    done = folder.done_keys({p.key: fingerprint(recipe, p) for p in points})
    if model is None and all(p.key in done for p in points):
        return _finished(recipe, folder, points, excluded, processes, started)
    if ids is None:
        recipe.data.check_files()  # a missing data file fails here, before the model loads
    if model is None:
        from .models import load_model_and_tokenizer

        extra = {"attn_implementation": spec["attn_implementation"]} if spec.get("attn_implementation") else {}
        model, tokenizer = load_model_and_tokenizer(spec["id"], spec["dtype"], processes.device, **extra)
    if ids is None:
        if processes.rank != 0:
            processes.barrier()  # the main process tokenizes and fills the on-disk cache first
        ids = load_token_ids(recipe.data, tokenizer)
        if processes.rank == 0:
            processes.barrier()
    protocols = {e.name: e.protocol for e in recipe.experiments}
    mine = [p for i, p in enumerate(points) if i % processes.world_size == processes.rank and p.key not in done]
    reasons = {p.key: check_point(model, p) for p in points}
    for point in points:  # a value the recipe names explicitly must work: fail before measuring anything
        if reasons[point.key] is not None and point.origin == "explicit":
            raise ValueError(f"experiment {point.experiment!r}, {point.strategy} {point.settings}: {reasons[point.key]}")
    show = progress and processes.rank == 0
    for point in _progress(mine, show, "grid points", len(mine)):
        row = _base_row(recipe, point, processes.rank)
        reason = reasons[point.key]
        if reason is not None:
            row.update(status="skipped", reason=f"the default sweep cannot build it: {reason}")
        else:
            try:
                row.update(run_point(model, tokenizer, ids, protocols[point.experiment], point, show), status="ok")
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
                row.update(status="error", reason=f"{type(error).__name__}: {error}")
        folder.append(row)
    return _gather(recipe, folder, points, excluded, processes, started,
                   reused=len([p for p in points if p.key in done]), measured=len(mine))


def _finished(recipe, folder, points, excluded, processes, started) -> dict:
    """Every point is already in the run folder: gather, report, and load no model."""
    return _gather(recipe, folder, points, excluded, processes, started, reused=len(points), measured=0)


def _gather(recipe, folder, points, excluded, processes, started, reused: int, measured: int) -> dict:
    """Merge every process's rows (rank 0), write the report, and return the run's summary."""
    processes.barrier()
    rows = folder.merge([p.key for p in points]) if processes.rank == 0 else []
    if processes.rank == 0:
        from .report import write_report

        write_report(folder.path, recipe, rows, excluded)
    processes.barrier()
    return {"rows": rows, "excluded": excluded, "folder": folder.path, "seconds": time.perf_counter() - started,
            "reused": reused, "measured": measured}
