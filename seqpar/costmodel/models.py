"""Model presets for `seqpar plan`: public configs written as their HF `config.json` values (shapes
only: no weights are needed to predict), or any HF config.json / checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seqpar.model.config import ModelConfig
from seqpar.model.loader import DEFAULT_MODEL

# Llama 3.1's RoPE (config.json of meta-llama/Llama-3.1-{8B,70B,405B}): theta 500000, llama3
# scaling from the 8K pre-training context to 128K.
_LLAMA31 = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)

PRESETS: dict[str, dict[str, Any]] = {
    # google/gemma-3-1b-it config.json: 5 of every 6 layers attend through a 512-token window
    "gemma-3-1b": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
    },
    # meta-llama/Llama-3.1-8B config.json
    "llama-3.1-8b": {
        **_LLAMA31,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    # meta-llama/Llama-3.1-70B config.json
    "llama-3.1-70b": {
        **_LLAMA31,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    # meta-llama/Llama-3.1-405B config.json (Llama 3 405B has the same shapes)
    "llama-3.1-405b": {
        **_LLAMA31,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json: the model this project runs on CPU
    DEFAULT_MODEL: {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
ALIASES = {
    "llama-3-405b": "llama-3.1-405b",
    "llama-3-70b": "llama-3.1-70b",
    "llama-3-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/llama-3.1-405b": "llama-3.1-405b",
    "smollm2-135m-instruct": DEFAULT_MODEL,
    "google/gemma-3-1b-it": "gemma-3-1b",
}


def preset_config(name: str) -> ModelConfig:
    key = ALIASES.get(name.lower(), name.lower())
    return ModelConfig.from_hf(PRESETS[key])


def resolve_model_config(name_or_path: str) -> ModelConfig:
    """A preset name, a HF config.json file, or a directory holding one (read by seqpar's loader)."""
    key = name_or_path.lower()
    if key in PRESETS or key in ALIASES:
        return preset_config(key)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        from seqpar.model.loader import read_hf_config

        return read_hf_config(path)
    if path.is_file():
        try:
            return ModelConfig.from_hf(json.loads(path.read_text()))
        except KeyError as e:
            raise ValueError(f"{path}: not a HF config.json (missing key {e})") from e
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    raise ValueError(
        f"--model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a HF config.json "
        "file or a directory holding one"
    )
