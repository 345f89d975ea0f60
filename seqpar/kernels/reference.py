"""Plain-torch attention blocks in fp32: the reference the kernels are tested against, and the block
of a backend without a faster one (masked tiles on CUDA, any device without its own kernels)."""

from __future__ import annotations

import torch
from torch import Tensor


def reference_block(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, D] (q's dtype), lse [Lq, Hq] fp32; mask [Lq, Lk]
    bool (True = visible) overrides `causal`. A row that sees no key: lse -inf, out 0."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # [Lk, Hq, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale  # [Hq, Lq, Lk]
    if mask is None and causal:
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    return out.to(q.dtype), lse.transpose(0, 1).contiguous()


def reference_head_major(
    q: Tensor, kh: Tensor, vh: Tensor, causal: bool, scale: float, visible: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`reference_block` over head-major K/V [Hkv, Lk, D]: a backend's dense block in plain torch."""
    return reference_block(q, kh.transpose(0, 1), vh.transpose(0, 1), causal, scale, mask=visible)
