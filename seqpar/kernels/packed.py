"""Linear layers whose weights are packed once in oneDNN's blocked layout (CPU, fp32 and bf16).

`F.linear` on CPU reorders its weight for every call (bf16: oneDNN) or runs MKL's GEMV (fp32);
for a few rows the weight's bytes are all the work, and a weight kept in the blocked layout is
read about twice as fast. Measured (AMD EPYC Zen 5, torch 2.13, one thread, a 1,536 x 576 bf16
weight out of 30 cycled so that none stays in cache, `process_time` per call): 1 row 69 us
packed against 136 us plain (1.8-2.0x over three rounds), 2 rows 1.7x, 16 rows 1.5x; from 512
rows up plain is as fast or faster (0.8-1.0x), so prefill keeps the plain weights. A packed weight
is a private copy (an opaque oneDNN tensor: it cannot live in the host's shared weights file).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packable(weight: Tensor) -> bool:
    """Whether `pack` gives oneDNN's layout for this weight (fp16 needs AVX512-FP16 here)."""
    return (
        ONEDNN
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.numel() > 0
    )


def pack(weight: Tensor) -> Tensor:
    """`weight` [N, K] in oneDNN's blocked layout (a copy) where `packable`, else itself."""
    if packable(weight):
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    return weight


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ weight.T (+ bias) for a weight from `pack` (oneDNN's own layout)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class PackedLinear(nn.Module):
    """A linear layer with `weight` [N, K] packed once: x [..., K] -> [..., N]."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if not packable(weight):
            raise ValueError(
                f"PackedLinear needs an fp32 or bf16 CPU weight with oneDNN; got {weight.dtype} on {weight.device}"
            )
        self.weight = pack(weight)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return packed_linear(x, self.weight, self.bias)
        return packed_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).reshape(*x.shape[:-1], -1)
