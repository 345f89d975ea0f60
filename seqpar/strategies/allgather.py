"""All-gather K/V: every rank gathers the whole sequence's K/V, then attends locally.

No overlap is possible and K/V memory is not sharded during the call, but it is
one collective: the right choice for short or very ragged batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import all_gather_uneven, group_rank
from seqpar.kernels.attention import attention_with_lse
from seqpar.sharding.plan import ShardPlan


def gather_kv_packed(k: Tensor, v: Tensor, plan: ShardPlan, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """Every rank's k/v [T_r, Hkv, D] -> the whole batch's k/v [T, Hkv, D] in packed order."""
    hkv = k.shape[1]
    kv = torch.cat([k, v], dim=1)  # [T_local, 2 Hkv, D]: one collective for both
    parts = all_gather_uneven(kv, plan.local_counts, group)
    full = torch.cat(parts)[plan.inverse_rank_order.to(kv.device)]  # rank order -> packed order
    return full[:, :hkv], full[:, hkv:]


def allgather_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: ShardPlan,
    group: dist.ProcessGroup | None,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    k_full, v_full = gather_kv_packed(k, v, plan, group)
    out, _ = attention_with_lse(q, k_full, v_full, plan.layout(group_rank(group)), plan.global_layout, causal, scale)
    return out
