"""Key re-rotation follows every RoPE layout a tiny config builds, or is refused at ``make_cache`` (issue 16, items 1, 2).

Re-rotated sinks sit just before the window, so after eviction the next logits must equal the model run on
the kept tokens at contiguous positions. Layouts: half-split channel pairs (Llama, Qwen2), interleaved pairs
(Cohere, GLM), partial rotary (GPT-NeoX, Phi, StableLM, GLM), scaled frequencies (linear, yarn, llama3).
Frequencies that change with the sequence length are refused: ``dynamic`` for re-rotation, LongRoPE (Phi-3,
whose ``generate`` drops the cache at the switch) for every hf_kvplus cache.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import hf_kvplus
from hf_kvplus._compat import attn_implementation, cache_kwargs

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0)
SCALED = {"rope_theta": 10000.0, "factor": 4.0}
# name -> (config class, model class, config keywords)
FOLLOWED = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=1)),
    "gpt-neox-partial": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(rotary_pct=0.25)),
    "phi-partial": (tf.PhiConfig, tf.PhiForCausalLM, dict(partial_rotary_factor=0.5)),
    "stablelm-partial": (tf.StableLmConfig, tf.StableLmForCausalLM, dict(partial_rotary_factor=0.25, num_key_value_heads=4)),
    "cohere-interleaved": (tf.CohereConfig, tf.CohereForCausalLM, dict(num_key_value_heads=2)),
    "glm-partial-interleaved": (tf.GlmConfig, tf.GlmForCausalLM, dict(num_key_value_heads=2, head_dim=16)),
    "llama-linear": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_parameters={"rope_type": "linear", **SCALED})),
    "llama-yarn": (tf.LlamaConfig, tf.LlamaForCausalLM,
                   dict(rope_parameters={"rope_type": "yarn", **SCALED, "original_max_position_embeddings": 64})),
    "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM,
               dict(rope_parameters={"rope_type": "llama3", **SCALED, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})),
}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
            "long_factor": [1, 2, 4, 8, 16, 32, 64, 64], "original_max_position_embeddings": 4}
REFUSED = {  # name -> (config class, model class, config keywords, what the refusal says)
    "llama-dynamic": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_parameters={"rope_type": "dynamic", **SCALED}),
                      "rerotate_keys=False"),
    "gptj-no-rotary-module": (tf.GPTJConfig, tf.GPTJForCausalLM, dict(n_embd=64, n_head=4, n_layer=1, rotary_dim=8),
                              "rerotate_keys=False"),
}


def _build(config_class, model_class, kwargs):
    torch.manual_seed(0)
    model = model_class(config_class(**{**COMMON, **kwargs})).eval()
    for parameter in model.parameters():  # larger weights: a wrong rotation shows in the logits
        parameter.data.mul_(4.0) if parameter.dim() > 1 else None
    return model


@pytest.mark.parametrize("feed", ["steps", "chunks"])
@pytest.mark.parametrize("arch", list(FOLLOWED))
@torch.no_grad()
def test_rerotated_sinks_equal_the_kept_tokens_at_contiguous_positions(arch, feed):
    model = _build(*FOLLOWED[arch])
    sinks, budget, total = 1, 4, 14
    ids = torch.randint(3, 90, (1, total), generator=torch.Generator().manual_seed(1))
    cache = hf_kvplus.make_cache("sink", model, budget=budget, num_sink_tokens=sinks)
    if feed == "steps":  # one token per forward: slot storage once full (sinks re-rotated in place)
        for t in range(total - 1):
            model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
    else:  # forwards of several tokens: the dense path re-rotates the displaced sinks
        for start in range(0, total - 1, 5):
            model(ids[:, start : min(start + 5, total - 1)], **cache_kwargs(cache), use_cache=True)
    kept = list(range(sinks)) + list(range(total - 1 - (budget - sinks), total - 1))
    assert cache.layers[0].pos.tolist() == kept
    got = model(ids[:, -1:], **cache_kwargs(cache), use_cache=True).logits[0, -1]
    positions = torch.arange(total - 1 - budget, total)[None]  # contiguous, ending at the present
    expected = model(ids[:, kept + [total - 1]], position_ids=positions).logits[0, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    unrotated = hf_kvplus.make_cache("sink", model, budget=budget, num_sink_tokens=sinks, rerotate_keys=False)
    for t in range(total - 1):
        model(ids[:, t : t + 1], **cache_kwargs(unrotated), use_cache=True)
    wrong = model(ids[:, -1:], **cache_kwargs(unrotated), use_cache=True).logits[0, -1]
    assert (wrong - expected).abs().max() > 1e-3  # the comparison can tell a wrong rotation


@pytest.mark.parametrize("arch", list(REFUSED))
def test_rerotation_the_model_does_not_allow_is_refused_at_make_cache(arch):
    *parts, message = REFUSED[arch]
    model = _build(*parts)
    with pytest.raises(ValueError, match=message):
        hf_kvplus.make_cache("sink", model, budget=4, num_sink_tokens=1)
    with pytest.raises(ValueError, match=message):
        hf_kvplus.make_cache("sink", model.config, budget=4, num_sink_tokens=1)
    hf_kvplus.make_cache("sink", model, budget=4, num_sink_tokens=1, rerotate_keys=False)  # without re-rotation: fine


def _phi3_longrope():
    kwargs = dict(num_key_value_heads=4, rope_parameters=dict(LONGROPE), original_max_position_embeddings=4)
    return _build(tf.Phi3Config, tf.Phi3ForCausalLM, kwargs)


@pytest.mark.parametrize("name", [name for name in hf_kvplus.list_caches() if name != "dynamic"] + ["int8", "window"])
def test_a_model_that_switches_rope_frequencies_and_recreates_the_cache_is_refused(name):
    """Issue 16 item 1: Phi-3 LongRoPE; past the switch ``generate`` would continue on a new DynamicCache."""
    model = _phi3_longrope()
    kwargs = {"budget": 2} if hf_kvplus.get_spec(name).evicting else {}
    with pytest.raises(ValueError, match=r"LongRoPE.*past 4 tokens.*DynamicCache"):
        hf_kvplus.make_cache(name, model, **kwargs)
    assert getattr(model, "_hf_kvplus_input_hook", None) is None and attn_implementation(model) == "sdpa"
    with pytest.raises(ValueError, match=r"LongRoPE.*past 4 tokens"):  # a cache built from the config alone
        hf_kvplus.make_cache(name, model.config, **kwargs)


@torch.no_grad()
def test_the_longrope_switch_replaces_a_cache_in_generate():
    """Why it is refused: the user's cache stops at the switch and generate continues on another cache."""
    model = _phi3_longrope()
    cache = tf.DynamicCache(config=model.config)
    out = model.generate(torch.randint(3, 90, (1, 4)), **cache_kwargs(cache), max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True)
    assert out.sequences.shape[1] == 6
    assert cache.get_seq_length() == 4  # 5 expected if generate had kept it
    assert hf_kvplus.make_cache("dynamic", model).get_seq_length() == 0  # transformers' own cache is not refused


@torch.no_grad()
def test_multimodal_rope_sections_are_refused_for_rerotation():
    text = dict(COMMON, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    model = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision)).eval()
    with pytest.raises(ValueError, match="multimodal sections.*rerotate_keys=False"):
        hf_kvplus.make_cache("sink", model, budget=4, num_sink_tokens=1)


@torch.no_grad()
def test_issue_16_cohere_interleaved_pairs_after_the_first_eviction():
    """The issue's input: budget 2, one sink, a 4-token stream on a 1-layer Cohere (was 2e-2 off)."""
    model = _build(*FOLLOWED["cohere-interleaved"])
    ids = torch.randint(3, 90, (1, 4), generator=torch.Generator().manual_seed(0))
    cache = hf_kvplus.make_cache("sink", model, budget=2, num_sink_tokens=1)
    for t in range(3):
        model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
    got = model(ids[:, 3:], **cache_kwargs(cache), use_cache=True).logits[0, -1]
    expected = model(ids[:, [0, 2, 3]], position_ids=torch.tensor([[1, 2, 3]])).logits[0, -1]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
