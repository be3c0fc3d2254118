"""Evaluation: models and texts, perplexity protocols, memory and speed."""

from .models import (
    DEFAULT_MODEL,
    default_model_file,
    load_default_model,
    load_default_text,
    load_default_tokenizer,
    load_model_and_tokenizer,
    parse_dtype,
)
from .perplexity import MIB, compression_perplexity, decode_speed, streaming_perplexity, window_starts

__all__ = [
    "DEFAULT_MODEL",
    "MIB",
    "compression_perplexity",
    "decode_speed",
    "default_model_file",
    "load_default_model",
    "load_default_text",
    "load_default_tokenizer",
    "load_model_and_tokenizer",
    "parse_dtype",
    "streaming_perplexity",
    "window_starts",
]
