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
    inv_freq = 1.0 / (config.rope_theta**exponents)
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
    if kind == "yarn":
        return _yarn_inv_freq(config)
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


def _yarn_correction_range(scaling: dict, dim: int, base: float) -> tuple[float, float]:
    # YaRN (arXiv 2309.00071): dimension index at which a frequency turns `rotations` times over the
    # original context, d(r) = dim * ln(L / (2 pi r)) / (2 ln base). Frequencies turning more than
    # beta_fast times are kept (extrapolated), fewer than beta_slow times are divided by `factor`.
    old_context = scaling["original_max_position_embeddings"]

    def at(rotations: float) -> float:
        return (dim * math.log(old_context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = at(scaling.get("beta_fast") or 32), at(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn_inv_freq(config: ModelConfig) -> Tensor:
    # Same ops in the same order as transformers' `_compute_yarn_parameters`, so fp32 angles agree bit for bit.
    scaling, dim, base = config.rope_scaling or {}, config.head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling["factor"] * pos_freqs)
    low, high = _yarn_correction_range(scaling, dim, base)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate (low frequency)
    return interpolation * (1 - keep) + extrapolation * keep


def rope_attention_scaling(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by: 1, except for YaRN, whose "mscale" sharpens attention
    (softmax temperature) to make up for the entropy interpolated positions lose."""
    scaling = config.rope_scaling
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions: positions [T] -> (cos, sin), each [T, D]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Not persistent: derived from the config, so it is never a checkpoint key.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.attention_scaling = rope_attention_scaling(config)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # fp32 angles whatever the model dtype: a bf16 angle at position 100k is off by
        # hundreds of radians. Positions are exact in fp32 up to 2**24 tokens.
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]: HF's half-split rotation layout
        if self.attention_scaling == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        # Scaled in fp32 before the cast, as transformers does.
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [T, H, D] by per-token angles cos/sin [T, D] (half-split layout, as HF)."""
    half = x.shape[-1] // 2
    sin = sin[:, None, :]
    # x * cos + rotate_half(x) * sin, without materialising rotate_half(x): ~10x faster on CPU
    # for a prefill's q (one output tensor, two in-place multiply-adds on its halves).
    out = x * cos[:, None, :]
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out
