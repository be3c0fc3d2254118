"""The one place where hf_kvplus touches transformers internals.

Everything else in the package uses the public API (``Cache``, ``CacheLayerMixin``,
``AttentionInterface``, ``AttentionMaskInterface``, ``PreTrainedModel``). The names below are
not part of transformers' documented API; they were checked against transformers 5.20 - 5.23.
If one moves, this file is the only one to change.
"""

from __future__ import annotations

import torch
import transformers

TESTED_TRANSFORMERS = (">=5.20", "<6")

# SDPA as transformers calls it (GQA handling, causal-skip rules): our attention function
# delegates to it so that outputs are identical to `attn_implementation="sdpa"`.
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

# The boolean mask builder registered for "sdpa"; we register the same builder for our name.
from transformers.masking_utils import sdpa_mask  # noqa: E402

__all__ = ["sdpa_attention_forward", "sdpa_mask", "rope_parameters", "quantized_layer_history", "TESTED_TRANSFORMERS"]


def rope_parameters(model_or_config) -> tuple[torch.Tensor, float] | None:
    """Inverse frequencies and attention scaling of the model's rotary embedding, or ``None``.

    With a model, the buffers of its rotary module are read (they include any RoPE scaling).
    With a config, they are computed as transformers computes them. ``None`` means the model has
    no rotary embedding we know how to reproduce (re-rotating keys is then refused).
    """
    if isinstance(model_or_config, torch.nn.Module):
        for module in model_or_config.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor) and hasattr(module, "attention_scaling"):
                if getattr(module, "rope_type", "default") == "dynamic":
                    return None  # frequencies change with the sequence length
                return inv_freq.detach().float().cpu().clone(), float(module.attention_scaling)
        return None
    config = model_or_config.get_text_config(decoder=True)
    params = getattr(config, "rope_parameters", None)
    if not params or "rope_theta" not in params:
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        return None
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        return None
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


def transformers_version() -> str:
    return transformers.__version__


def quantized_layer_history(layer) -> list[torch.Tensor]:
    """The quantized tensors of a transformers ``QuantizedLayer`` (its private ``_quantized_keys/_values``).

    Used by ``benchmarks/quantized.py`` to count the bits per element of transformers' ``QuantizedCache``.
    """
    return [t for t in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)) if t is not None]
