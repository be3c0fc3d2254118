"""Evaluation: models and texts, protocols (one class each), memory and speed, recipes, one runner, reports, Hub upload."""

from .data import DataSpec, cache_dir, load_text, load_token_ids
from .generation_cost import forward_flops, generation_cost, generation_flops
from .grid import Point
from .hub import push_run, stage_run
from .models import (
    DEFAULT_MODEL,
    default_model_file,
    load_default_model,
    load_default_text,
    load_default_tokenizer,
    load_model_and_tokenizer,
    parse_dtype,
)
from .passkey import load_metric, passkey_retrieval
from .perplexity import MIB, compression_perplexity, decode_speed, streaming_perplexity, window_starts
from .plot import pareto_plot
from .prompt_order import prompt_order
from .protocols import PROTOCOLS, Metric, Option, Protocol, get_protocol, register_protocol
from .recipe import Experiment, Recipe, expand_grid, load_recipe, packaged_recipes, parse_recipe
from .report import summary_markdown
from .results import RunFolder
from .tables import markdown_table
from .runner import run_point, run_recipe

__all__ = [
    "DEFAULT_MODEL",
    "MIB",
    "PROTOCOLS",
    "DataSpec",
    "Metric",
    "Option",
    "Protocol",
    "Experiment",
    "Point",
    "Recipe",
    "RunFolder",
    "cache_dir",
    "compression_perplexity",
    "decode_speed",
    "default_model_file",
    "expand_grid",
    "forward_flops",
    "generation_cost",
    "generation_flops",
    "get_protocol",
    "load_default_model",
    "load_default_text",
    "load_default_tokenizer",
    "load_metric",
    "load_model_and_tokenizer",
    "load_recipe",
    "load_text",
    "load_token_ids",
    "markdown_table",
    "packaged_recipes",
    "pareto_plot",
    "parse_dtype",
    "parse_recipe",
    "passkey_retrieval",
    "prompt_order",
    "push_run",
    "register_protocol",
    "run_point",
    "run_recipe",
    "stage_run",
    "streaming_perplexity",
    "summary_markdown",
    "window_starts",
]
