"""The CPU backend's dense block: PyTorch's CPU flash kernel, which takes GQA natively and returns the
LSE (~10x a matmul + softmax)."""

from __future__ import annotations

import torch
from torch import Tensor


def cpu_block(
    q: Tensor, kh: Tensor, vh: Tensor, causal: bool, scale: float, visible: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """q [Lq, Hq, D], kh/vh [Hkv, Lk, D] (head-major) -> out [Lq, Hq, D], lse [Lq, Hq] fp32; `visible`
    [Lq, Lk] bool: an explicit mask (a sliding window's tile), passed as an additive one."""
    qb = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
    kb, vb = kh.unsqueeze(0), vh.unsqueeze(0)  # [1, Hkv, Lk, D]
    lq, hq, hkv = q.shape[0], q.shape[1], kh.shape[0]
    if not causal and visible is None and hq > hkv:
        # No mask: the g query heads of one KV head are g times the rows against the same keys.
        # The kernel tiles rows more coarsely with more of them (~13% faster at 256 rows), and a
        # decode row reads each KV head once for its g query heads (2.4x faster at 1K keys).
        qf = qb.reshape(1, hkv, (hq // hkv) * lq, q.shape[-1])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf, kb, vb, 0.0, scale=scale)
        return out.reshape(hq, lq, -1).transpose(0, 1), lse.reshape(hq, -1)[:, :lq].transpose(0, 1).float()
    mask = None
    if visible is not None:  # additive, in q's dtype (the kernel's rule)
        mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))[None, None]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qb, kb, vb, 0.0, is_causal=causal, attn_mask=mask, scale=scale
    )
    # out [1, Hq, Lq, D] -> [Lq, Hq, D]; lse [1, Hq, Lq] -> [Lq, Hq]
    return out[0].transpose(0, 1), lse[0, :, :lq].transpose(0, 1).float()
