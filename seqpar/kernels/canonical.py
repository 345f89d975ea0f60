"""Attention in one canonical order, the same bits however the work is split.

A query at position p attends keys [0, p]. Cut positions into KV units of U tokens
(unit u holds [uU, (u+1)U)). The canonical result of a query is:
1. for each unit u <= p // U, a partial (o_u, lse_u) from one CPU flash-kernel call over the
   unit's U keys (keys the query may not see masked with -inf, a last unit padded with any
   finite keys, masked too), the query among rows padded so that every one of the kernel's query
   blocks is full;
2. those partials merged left to right, u = 0, 1, ..., in fp32 (`OrderedMerge`).
Every rank of any SP degree, a chunk of any size, a decode step or a prefill computes a row this
way, so its bits do not depend on which rows share its call, how the keys were spread over
ranks, or where they were read from.

Why each call gives a row the same bits (measured, torch 2.13 CPU, fp32 and bf16, 1 and 2
threads): the kernel splits queries into blocks of 32, 64 or 256 rows (by row count: < 192,
< 768, more) and keys into blocks of 512; a row's arithmetic is two GEMMs over its query block
and per-row softmax code. Once every query block is full (rows padded) and the keys are a fixed
U <= 512, a row's result is the same at any row count, offset or neighbours; a mask of zeros,
an expanded one and none agree. A short last block (1-3 rows, or 17) does not.

Merging (o_a, lse_a) then (o_b, lse_b) with running max m, weight sum s and unnormalised acc:
    m' = max(m, lse_b); a = exp(m - m'); b = exp(lse_b - m')
    acc' = acc * a + o_b * b;  s' = s * a + b;  out = acc / s
(acc / s = sum_u exp(lse_u - m) o_u / sum_u exp(lse_u - m), the LSE merge of merge.py). Only
max, exp, mul, add and div: ops whose vector and scalar code agree, so a row's result does not
depend on where it sits in the tensor. A unit with lse = -inf (absent) leaves the state as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.profiling import KERNEL, MERGE, traced


def padded_rows(n: int) -> int:
    """Rows to give the CPU flash kernel so that every query block it cuts is full."""
    while True:
        block = 32 if n < 192 else 64 if n < 768 else 256
        padded = -(-max(n, 1) // block) * block
        if padded == n:
            return n
        n = padded


@traced(KERNEL)
def _call(q: Tensor, kh: Tensor, vh: Tensor, vis: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """q [n, Hq, D] over one unit kh, vh [Hkv, U, D]; vis [n] keys each row sees (None: all U).
    -> o [n, Hq, D] fp32, lse [n, Hq] fp32."""
    n, hq, d = q.shape
    hkv, u = kh.shape[0], kh.shape[1]
    g = hq // hkv
    rows = padded_rows(g * n)
    # GQA: a KV head's g query heads are g * n rows against the same keys (rows head-major).
    qp = q.new_zeros(1, hkv, rows, d)
    qp[0, :, : g * n] = q.transpose(0, 1).reshape(hkv, g * n, d)
    mask = None
    if vis is not None:
        cols = torch.arange(u, device=q.device)
        rowmask = torch.zeros(n, u, dtype=q.dtype, device=q.device)
        rowmask.masked_fill_(cols.unsqueeze(0) >= vis.unsqueeze(1), float("-inf"))  # [n, U]
        mask = q.new_zeros(1, 1, rows, u)
        mask[0, 0, : g * n] = rowmask.repeat(g, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qp, kh.unsqueeze(0), vh.unsqueeze(0), 0.0, attn_mask=mask, scale=scale
    )
    o = out[0, :, : g * n].reshape(hq, n, d).transpose(0, 1).float()  # [n, Hq, D]
    return o, lse[0, :, : g * n].reshape(hq, n).transpose(0, 1).float()


class OrderedMerge:
    """Running canonical merge for rows [0, n): partials added unit by unit, left to right."""

    def __init__(self, n: int, hq: int, d: int, device: torch.device) -> None:
        self.acc = torch.zeros(n, hq, d, dtype=torch.float32, device=device)
        self.m = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=device)
        self.s = torch.zeros(n, hq, dtype=torch.float32, device=device)

    @traced(MERGE)
    def add(self, row: int, o: Tensor, lse: Tensor) -> None:
        """Merge the next unit's partial o [k, Hq, D], lse [k, Hq] into rows [row, row + k)."""
        rows = slice(row, row + o.shape[0])
        m = self.m[rows]
        top = torch.maximum(m, lse)
        wa = (m - top).exp_()  # a row's first unit: exp(-inf) = 0, so acc starts at o exactly
        wb = (lse - top).exp_()
        wb = wb.masked_fill_(torch.isneginf(lse), 0.0)  # an absent unit (lse -inf) adds nothing
        acc = self.acc[rows]
        acc.mul_(wa.unsqueeze(-1)).add_(o * wb.unsqueeze(-1))
        self.s[rows].mul_(wa).add_(wb)
        m.copy_(top)

    def result(self) -> Tensor:
        """out [n, Hq, D] fp32; a row no unit reached is 0."""
        s = self.s.masked_fill(self.s == 0, 1.0)
        return self.acc / s.unsqueeze(-1)


def attend_unit(merge: OrderedMerge, row: int, q: Tensor, vis: Tensor, kh: Tensor, vh: Tensor, scale: float) -> None:
    """Merge the partials of q [k, Hq, D] (rows [row, row + k) of `merge`) over one unit kh, vh
    [Hkv, U, D]; vis [k] (non-decreasing, >= 1): keys [0, vis) of the unit each row sees."""
    u = kh.shape[1]
    full = int((vis < u).sum())  # rows before this see part of the unit: a masked call
    if full:
        o, lse = _call(q[:full], kh, vh, vis[:full], scale)
        merge.add(row, o, lse)
    if full < q.shape[0]:
        o, lse = _call(q[full:], kh, vh, None, scale)
        merge.add(row + full, o, lse)
