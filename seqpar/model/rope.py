"""Rotary position embedding driven by explicit token positions.

Sequence-parallel sharding reorders tokens (zigzag, striped, packed ragged batches), so
the rotation angle of a token must come from its true global position, never from its
index in the local tensor. Everything here takes `positions` and nothing assumes arange.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seqpar.model.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse frequencies [D/2] in fp32, computed exactly as transformers does (same ops,
    same order) so that logits match HF to fp32 rounding."""
    dim = config.head_dim
    # Explicit device: this may run under a `torch.device("meta")` context while loading.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "freq_factors":
        # llama.cpp divides each frequency's angle by its factor (ggml rope `freq_factors`).
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope type {kind!r}")  # ModelConfig validation prevents this


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    # Llama 3.1: long wavelengths (low frequencies) are slowed down by `factor`, short ones
    # are kept, and the band in between is interpolated linearly in 1/wavelength.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions: positions [T] -> (cos, sin), each [T, D]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Not persistent: derived from the config, so it is never a checkpoint key.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # fp32 angles whatever the model dtype: a bf16 angle at position 100k is off by
        # hundreds of radians. Positions are exact in fp32 up to 2**24 tokens.
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]: HF's half-split rotation layout
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [T, H, D] by per-token angles cos/sin [T, D] (half-split layout, as HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
