"""Run a recipe: every grid point of every experiment, into a resumable run folder.

Every protocol goes through here (the perplexity sweeps and the cost-of-caching and prompt-order studies
alike): a point's rows are appended to the run folder as soon as it is measured, a finished point is not
measured again, and under ``accelerate launch`` the points are dealt round-robin to the processes; each writes
its own rows and the main process gathers one result set, the plots and the summary.
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
from .grid import NONE, Point
from .perplexity import MIB, progress_bar
from .protocols import Protocol, get_protocol
from .recipe import needs_data
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
    """``None`` if the point's cache builds on this model (or it needs none), else why not (the strategy's message)."""
    if point.strategy == NONE:
        return None
    try:
        make_cache(point.strategy, model.config, **point.cache_kwargs)
    except (ValueError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _mib(row: dict) -> dict:
    """Byte counts (keys holding ``cache_bytes``) as MiB (``cache_mib``), lists element by element."""
    out = {}
    for key, value in row.items():
        if "cache_bytes" in key:
            key = key.replace("cache_bytes", "cache_mib")
            value = [v / MIB for v in value] if isinstance(value, list) else None if value is None else value / MIB
        out[key] = value
    return out


def run_point(model, tokenizer, ids, protocol: str | Protocol, point: Point, progress: bool = False) -> list[dict]:
    """Measure one grid point: the protocol's rows plus memory (cache MiB, peak RSS / CUDA) and time.

    Args:
        model (`PreTrainedModel`): the model.
        tokenizer: its tokenizer (the passkey and prompt-order protocols write prompts).
        ids (`torch.Tensor`): ``[tokens]`` token ids of the text (``None`` for protocols that read none).
        protocol (`str` or `Protocol`): a registered protocol name (``"compression"``...) or the protocol itself.
        point (`Point`): the grid point to run.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `list[dict]`: the point's rows (one for the perplexity protocols), each with the protocol's metrics,
        ``cache_mib`` for its ``cache_bytes``, and the point's ``peak_rss_mib``, ``device_peak_mib`` and
        ``seconds`` (wall time) where the protocol's own row does not define them.

    Example:

    ```python
    >>> point = load_recipe("default").experiments[0].points[1]
    >>> run_point(model, tokenizer, ids, "compression", point)[0]["ppl"]
    ```
    """
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    factory = None if point.strategy == NONE else (lambda: make_cache(point.strategy, model, **point.cache_kwargs))
    reset_peak_memory(model.device)
    started = time.perf_counter()
    try:
        result = protocol.run(model, tokenizer, ids, factory, point.options, progress=progress)
    finally:
        if point.strategy != NONE and get_spec(point.strategy).attention_scores:
            detach(model)  # hooks removed, so the next strategies run (and are timed) without them
    seconds = time.perf_counter() - started
    peaks = peak_memory(model.device)
    rows = protocol.finish([_mib(row) for row in ([result] if isinstance(result, dict) else result)], point)
    point_columns = {"peak_rss_mib": peaks["peak_rss_bytes"] / MIB, "seconds": seconds,
                     "device_peak_mib": None if peaks["device_peak_bytes"] is None else peaks["device_peak_bytes"] / MIB}
    return [{**point_columns, **row} for row in rows]


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
    points = [p for e in recipe.experiments for p in e.points]  # expanded and checked once, by parse_recipe
    excluded = [x for e in recipe.experiments for x in e.excluded]
    if processes.rank == 0 and recipe.text:
        (folder.path / "recipe.yaml").write_text(recipe.text)
    done = folder.done_keys({p.key: fingerprint(recipe, p) for p in points})
    if model is None and all(p.key in done for p in points):
        return _finished(recipe, folder, points, excluded, processes, started)
    if model is None:
        from .models import load_model_and_tokenizer

        extra = {"attn_implementation": spec["attn_implementation"]} if spec.get("attn_implementation") else {}
        model, tokenizer = load_model_and_tokenizer(spec["id"], spec["dtype"], processes.device, **extra)
    if ids is None and needs_data(recipe):
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
    for point in progress_bar(mine, show, "grid points", len(mine)):
        row = _base_row(recipe, point, processes.rank)
        reason = reasons[point.key]
        if reason is not None:
            rows = [{**row, "status": "skipped", "reason": f"the default sweep cannot build it: {reason}"}]
        else:
            try:
                measured = run_point(model, tokenizer, ids, protocols[point.experiment], point, show)
                rows = [{**row, **measured_row, "status": "ok"} for measured_row in measured]
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
                rows = [{**row, "status": "error", "reason": f"{type(error).__name__}: {error}"}]
        folder.append_point(rows)
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
