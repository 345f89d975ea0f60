"""Per-token layers: RMSNorm and the SwiGLU MLP. Neither mixes tokens."""

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


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)). Under tensor parallelism gate/up become column-parallel
    and down row-parallel; this module does not know."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj: nn.Module = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj: nn.Module = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj: nn.Module = nn.Linear(intermediate_size, hidden_size, bias=False)
        # gate and up as one layer of their weights stacked, where a copy of the model sets it (the
        # engine's decode copies: seqpar.engine.parallel): one GEMM reads both.
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate).mul_(up))
        h = self.gate_proj(x)  # [T, I]: activation and product in place, no [T, I] temporaries
        F.silu(h, inplace=True)
        return self.down_proj(h.mul_(self.up_proj(x)))
