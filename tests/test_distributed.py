"""``accelerate launch`` with 2 CPU processes shards the grid and gathers one result set."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import save_tiny

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_share_the_grid_and_gather_one_result_set(tmp_path):
    (tmp_path / "text.txt").write_text("Attention sinks keep streaming models stable at constant memory. " * 30)
    recipe = {
        "name": "tiny-shards", "model": save_tiny(tmp_path / "tiny"), "data": {"path": str(tmp_path / "text.txt")},
        "experiments": [{"name": "compression", "protocol": {"name": "compression", "context_length": 32,
                                                             "target_length": 8, "decode_tokens": 0},
                         "keep_ratios": [0.5, 0.25], "grid": ["dynamic", "sink", "window"]}],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_KVPLUS_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    # On a machine without CUDA, --multi_gpu starts torchrun-style processes; hf_kvplus joins them over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "hf_kvplus.cli", "eval", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"), "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["key"].split("|", 2)[1] for r in rows] == ["dynamic", "sink", "sink", "window", "window"]  # grid order
    assert [r["rank"] for r in rows] == [0, 1, 0, 1, 0]  # dealt round-robin
    assert all(r["status"] == "ok" for r in rows)
    assert not list((tmp_path / "run").glob("results.rank*.jsonl"))  # gathered, then removed
    assert (tmp_path / "run" / "results.csv").read_text().count("\n") == 6
    assert (tmp_path / "run" / "pareto.png").is_file() and done.stdout.count("| dynamic | all tokens |") == 1


def test_two_processes_share_the_studies_and_resume_them(tmp_path):
    """The cost-of-caching and prompt-order protocols go through the same runner: dealt round-robin, gathered, resumed."""
    recipe = {
        "name": "tiny-studies", "model": save_tiny(tmp_path / "tiny"), "data": {"path": str(tmp_path / "text.txt")},
        "experiments": [
            {"name": "cost", "protocol": {"name": "cost_of_caching", "new_tokens": [2, 4], "prompt_tokens": 8,
                                          "no_cache_max_new_tokens": 2}, "grid": ["none", "dynamic"]},
            {"name": "order", "protocol": {"name": "prompt_order", "turns": 2}},
        ],
    }
    (tmp_path / "text.txt").write_text("Attention sinks keep streaming models stable at constant memory. " * 5)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_KVPLUS_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", "hf_kvplus.cli", "eval", str(tmp_path / "recipe.yaml"), "--out",
               str(tmp_path / "run"), "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    points = [(r["experiment"], r.get("method", r.get("ordering")), r["rank"]) for r in rows if r.get("part", 0) == 0]
    assert points == [("cost", "no cache", 0), ("cost", "dynamic", 1), ("order", "stable_first", 0),
                      ("order", "variable_first", 1)]  # grid order, dealt round-robin
    assert len(rows) == 2 * 2 + 2 * 2 and all(r["status"] == "ok" for r in rows)
    assert not list((tmp_path / "run").glob("results.rank*.jsonl"))
    assert {p.name for p in (tmp_path / "run").glob("*.png")} == {"cost.png", "order.png"}
    command[command.index("--main_process_port") + 1] = str(free_port())
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "reused 4 finished grid point(s)" in again.stdout, again.stderr[-3000:]
