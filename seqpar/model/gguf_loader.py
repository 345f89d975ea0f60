"""GGUF (llama.cpp) checkpoints: metadata -> ModelConfig, tensors dequantized to HF layout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seqpar.model.config import ConfigError, ModelConfig
from seqpar.model.weights import ModelLoadError

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3's four norms per layer: llama.cpp's "ffn_norm" is the MLP's input norm there.
_GEMMA3_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tokenizer arrays hold ~50k-150k entries each and the config needs none of their values.
_SKIPPED_FIELDS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
)


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, kind, suffix = m.groups()
        names = _GEMMA3_NAMES if architecture == "gemma3" else _BLOCK_NAMES
        return f"model.layers.{layer}.{names[kind]}.{suffix}" if kind in names else None
    base, _, suffix = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{suffix}" if base in _GLOBAL_NAMES else None


def unpermute_rotary_rows(w: Tensor, n_head: int) -> Tensor:
    """Undo convert_hf_to_gguf.py's q/k row permutation for llama-architecture GGUFs.

    HF rotates the two halves of each head ([x0..x_{D/2-1}] with [x_{D/2}..]); llama.cpp
    rotates adjacent pairs. The converter therefore reorders each head's output rows as
    `w.reshape(n_head, 2, D/2, in).swapaxes(1, 2)` (half-major -> pair-major); here the
    rows are read as [n_head, D/2, 2] and swapped back. Works for weights and biases.
    """
    rows = w.shape[0]
    # [rows, *rest] -> [n_head, D/2, 2, *rest] -> [n_head, 2, D/2, *rest] -> [rows, *rest]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _open(path: Path) -> tuple[Any, ModelConfig, dict[str, Any]]:
    """(gguf module, config, tensors by GGUF name without rope_freqs) of a GGUF file."""
    import gguf  # heavy-ish import, only needed for GGUF checkpoints

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated files
        raise ModelLoadError(f"{path}: cannot parse GGUF file (truncated or corrupt?): {e}") from e
    metadata: dict[str, Any] = {k: f.contents() for k, f in reader.fields.items() if k not in _SKIPPED_FIELDS}
    by_name = {t.name: t for t in reader.tensors}
    # GGUF shapes list the fastest-varying dimension first; torch's order is the reverse.
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    rope_freqs = None
    if "rope_freqs.weight" in by_name:
        rope_freqs = _dequantize(gguf, by_name.pop("rope_freqs.weight"), path).tolist()
    try:
        config = ModelConfig.from_gguf(metadata, shapes, rope_freqs)
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    return gguf, config, by_name


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and fp32 tensors (HF names and layout) of a GGUF file."""
    gguf, config, by_name = _open(path)

    tensors: dict[str, Tensor] = {}
    for name, t in by_name.items():
        w = _dequantize(gguf, t, path)
        hf_name = hf_tensor_name(name, config.architecture)
        if hf_name is None:  # passed through under its GGUF name: reported as unexpected
            tensors[name] = w
            continue
        if config.architecture == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp's converter stores Gemma's (1 + weight) whole
        # Only llama-architecture conversion permutes q/k (Qwen2's and Qwen3's converters do not).
        if config.architecture == "llama" and ".attn_q." in name:
            w = unpermute_rotary_rows(w, config.num_heads)
        elif config.architecture == "llama" and ".attn_k." in name:
            w = unpermute_rotary_rows(w, config.num_kv_heads)
        tensors[hf_name] = w
    return config, tensors


def _dequantize(gguf: Any, t: Any, path: Path) -> Tensor:
    shape = tuple(int(n) for n in reversed(t.shape))
    try:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        # np.array copies: unquantized tensors are views of the reader's read-only memmap.
        return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read tensor {t.name} ({t.tensor_type.name}, shape {shape}): {e}") from e
