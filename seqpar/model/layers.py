"""Per-token layers: RMSNorm (and Gemma's, scaled by 1 + weight) and the gated MLP (SwiGLU, or
Gemma's GELU-tanh). None mixes tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor, fp32_out: bool = False) -> Tensor:
        """`fp32_out`: scale in fp32 and return fp32 (the final norm, whose output makes the logits)."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # Statistics in fp32 even for bf16 activations (as HF), then scale in the input dtype.
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if fp32_out:
            return self.weight.float() * x32
        return self.weight * x32.to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is an offset from 1, and the scaling is done in fp32 before the
    cast back (transformers' Gemma3RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor, fp32_out: bool = False) -> Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return x32 if fp32_out else x32.to(x.dtype)


class SwiGLUMLP(nn.Module):
    """down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or GELU with the tanh approximation (Gemma's
    GeGLU). Under tensor parallelism gate/up become column-parallel and down row-parallel; this
    module does not know."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.act = act
        self.gate_proj: nn.Module = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj: nn.Module = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj: nn.Module = nn.Linear(intermediate_size, hidden_size, bias=False)
        # gate and up as one layer of their weights stacked, where a copy of the model sets it (the
        # engine's decode copies: seqpar.engine.parallel): one GEMM reads both.
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.act != "silu":
            gate, up = (
                self.gate_up_proj(x).chunk(2, dim=-1)
                if self.gate_up_proj is not None
                else (
                    self.gate_proj(x),
                    self.up_proj(x),
                )
            )
            return self.down_proj(F.gelu(gate, approximate="tanh").mul_(up))
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate).mul_(up))
        h = self.gate_proj(x)  # [T, I]: activation and product in place, no [T, I] temporaries
        F.silu(h, inplace=True)
        return self.down_proj(h.mul_(self.up_proj(x)))
