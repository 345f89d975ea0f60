"""Our loaded weights as a transformers CausalLM: the baseline benchmarks compare against.

The same checkpoint through the same loader (a GGUF is converted once into the cache),
so both models hold the same fp32 numbers and any difference is the implementation's.
"""

from __future__ import annotations

import inspect
from typing import Any

from seqpar.model.loader import load_model


def hf_model_from(model: str, rope_scaling: dict | None = None) -> Any:
    """transformers' CausalLM (sdpa attention, eval, no grad) with the weights `load_model(model)` gives."""
    import transformers as tf

    ours, mc = load_model(model, rope_scaling=rope_scaling)  # the same override for transformers (its config below)
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }
    if mc.architecture not in classes:
        raise ValueError(f"no transformers baseline for architecture {mc.architecture!r}")
    config_cls, model_cls = classes[mc.architecture]
    fields = dict(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        rms_norm_eps=mc.rms_norm_eps,
        max_position_embeddings=mc.max_position_embeddings,
        tie_word_embeddings=mc.tie_word_embeddings,
        bos_token_id=mc.bos_token_id,
        eos_token_id=list(mc.eos_token_ids) or None,
    )
    if mc.architecture in ("llama", "qwen3"):
        fields["attention_bias"] = mc.attention_bias
    if mc.architecture == "mistral":
        fields["sliding_window"] = None
    rope = {"rope_type": "default", **(mc.rope_scaling or {})}
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:  # transformers 5
        fields["rope_parameters"] = {**rope, "rope_theta": mc.rope_theta}
    else:
        fields["rope_theta"] = mc.rope_theta
        fields["rope_scaling"] = mc.rope_scaling
    hf_config = config_cls(**fields)
    hf_config._attn_implementation = "sdpa"
    hf = model_cls(hf_config).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if mc.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"transformers model does not match ours: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if mc.tie_word_embeddings:
        hf.tie_weights()
    return hf.requires_grad_(False)
