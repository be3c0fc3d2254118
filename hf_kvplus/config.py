"""What a cache reads from a model's config: the decoder part, its KV geometry, and argument checks."""

from __future__ import annotations

from transformers import PreTrainedConfig

from .storage.factory import STORAGE_KEYWORDS


def decoder_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder text config; a clear error for objects that are not configs or have no attention heads."""
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"expected a transformers model or PreTrainedConfig, got {type(config).__name__}")
    config = config.get_text_config(decoder=True)
    for attr in ("num_hidden_layers", "num_attention_heads"):
        value = getattr(config, attr, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{type(config).__name__} has {attr}={value!r}: hf_kvplus caches need a decoder config with an integer "
                f"{attr} >= 1"
            )
    return config


def text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder text config, checked: attention heads, and only full-attention layers."""
    config = decoder_config(config)
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise ValueError(
            f"hf_kvplus caches support models whose layers all use full attention; this config has {other}"
        )
    return config


def check_storage_keywords(cache_name: str, storage: dict, accepted: list[str]) -> None:
    """A ``TypeError`` for keywords that are neither the cache's own (``accepted``) nor storage keywords."""
    storage_names = ["store_factory", *STORAGE_KEYWORDS]
    unknown = sorted(set(storage) - set(storage_names))
    if unknown:
        raise TypeError(
            f"{cache_name} got unexpected keyword argument(s) {unknown}; it accepts {accepted + storage_names}"
        )


def kv_geometry(config: PreTrainedConfig) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` of a decoder config."""
    config = text_config(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim
