"""Exact merge of partial attention results by their log-sum-exp (LSE).

Shapes: out [T, H, D], lse [T, H] (fp32, natural log).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.profiling import MERGE, traced


@traced(MERGE)
def merge_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    With s_x = sum_{j in x} exp(q.k_j) = exp(lse_x) and o_x = sum_j exp(q.k_j) v_j / s_x:
        lse = log(s_a + s_b) = logaddexp(lse_a, lse_b)
        o   = (s_a o_a + s_b o_b) / (s_a + s_b) = o_a exp(lse_a - lse) + o_b exp(lse_b - lse)
    Subtracting the merged lse keeps both weights in [0, 1], so nothing overflows.
    A row where both sides saw no key (lse = -inf) would give exp(-inf - -inf) = NaN;
    it is pinned to lse = -inf, out = 0 instead.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)  # [T, H, 1]
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse


@traced(MERGE)
def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """`merge_states` in place into fp32 accumulators (a slice of them is fine).

    Same algebra; in-place ops, because the ring merges every block into them.
    """
    merged = torch.logaddexp(acc_lse, lse)
    safe = merged.masked_fill(torch.isneginf(merged), 0.0)  # no key on either side: weights 0
    acc_out.mul_((acc_lse - safe).exp_().unsqueeze(-1))
    acc_out.addcmul_(out, (lse - safe).exp_().unsqueeze(-1))
    acc_lse.copy_(merged)


@traced(MERGE)
def merge_many(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge N partial results at once: outs [N, T, H, D], lses [N, T, H].

    Same derivation as `merge_states`, with the max over N as the stabiliser.
    """
    m = lses.max(dim=0).values  # [T, H]
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - m_safe)  # [N, T, H]; 0 where a part saw no key
    denom = w.sum(dim=0)  # [T, H]
    out = (outs.float() * w.unsqueeze(-1)).sum(dim=0)
    out = out / torch.where(denom > 0, denom, torch.ones_like(denom)).unsqueeze(-1)
    lse = m_safe + torch.log(denom)  # log(0) = -inf for rows with no key
    return out.to(outs.dtype), lse
