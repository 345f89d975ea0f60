"""Dense attention blocks on CUDA, with LSE: the `triton` backend's block (`kernels/backends.py`).

`cuda_block` takes the kernels' shapes (q [Lq, Hq, D], head-major K/V [Hkv, Lk, D]); `flash_lse` the
SDPA ops' (q [1, Hq, Lq, D]; k, v [1, Hkv, Lk, D], views of the head-major cache, D contiguous ->
out [1, Hq, Lq, D], lse [1, Hq, Lq] fp32). `causal` is the square top-left triangle (Lq == Lk).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.kernels.reference import reference_head_major

# Whether this PyTorch's flash op takes fewer KV heads than query heads (2.5 and later do).
_flash_gqa = True


def cuda_block(
    q: Tensor, kh: Tensor, vh: Tensor, causal: bool, scale: float, visible: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One dense block; a sliding window's masked tile (`visible`) in plain torch, fp32 (PyTorch's
    flash op takes no mask, and the ops that do return no LSE)."""
    if visible is not None:
        return reference_head_major(q, kh, vh, False, scale, visible)
    out, lse = flash_lse(q.transpose(0, 1).unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0), causal, scale)
    return out[0].transpose(0, 1), lse[0, :, : q.shape[0]].transpose(0, 1).float()


def flash_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """CUDA: the flash kernel for half types, which reads a KV head once for its query heads (GQA
    native: no copy of K/V, where 15% of an 8B model's GPU time went); the memory-efficient kernel
    for fp32, which takes equal head counts only, so there KV heads are repeated."""
    global _flash_gqa
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and (_flash_gqa or q.shape[1] == k.shape[1]):
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            return res[0], res[1]
        except RuntimeError:
            if q.shape[1] == k.shape[1]:
                raise
            _flash_gqa = False  # an older flash op: repeat the heads from now on
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if half:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return res[0], res[1]
