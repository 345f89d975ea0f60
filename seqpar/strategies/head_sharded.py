"""The head-sharded layout (SGLang PR #1436): Q by heads over all tokens, K/V by sequence.

Each rank holds q [T, Hq_local, D] for *all* T tokens of the batch (its head shard,
as a column-parallel q_proj produces it) and K/V [T_r, Hkv, D] with all KV heads
only for the tokens the plan gives it (every rank needs every other rank's tokens
for its own heads, so blocks carry all KV heads). `kv_head_ids` names the KV heads
its q heads read, such that local q head i reads kv_head_ids[i // (Hq_local / n)];
None means all, as when each rank holds a share of every GQA group. K/V shards travel
around the ring (overlapped) or are gathered;
queries never move, and since every rank holds every query there is no causal
imbalance. The output [T, Hq_local, D] feeds a row-parallel o_proj.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from seqpar.kernels.attention import attention_with_lse
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.allgather import gather_kv_packed
from seqpar.strategies.registry import Strategy, register
from seqpar.strategies.ring import ring_core

KV_MODES = ("ring", "allgather")


def head_sharded_attention(
    q_heads: Tensor,
    k: Tensor,
    v: Tensor,
    plan: ShardPlan,
    group: dist.ProcessGroup | None,
    causal: bool = True,
    scale: float | None = None,
    kv_mode: str = "ring",
    kv_head_ids: list[int] | None = None,
) -> Tensor:
    """q_heads [T, Hq_local, D] in packed order; k, v [T_local, Hkv, D] as the plan shards them."""
    if q_heads.shape[0] != plan.total_tokens:
        raise ValueError(
            f"head_sharded attention takes q for all {plan.total_tokens} tokens of the batch; got {q_heads.shape[0]}"
        )
    if kv_mode == "ring":
        layouts = [plan.layout(r) for r in range(plan.world_size)]
        out, _ = ring_core(q_heads, k, v, plan.global_layout, layouts, group, causal, scale, kv_head_ids)
        return out.to(q_heads.dtype)
    if kv_mode == "allgather":
        k_full, v_full = gather_kv_packed(k, v, plan, group)
        if kv_head_ids is not None:
            k_full, v_full = k_full[:, kv_head_ids], v_full[:, kv_head_ids]
        out, _ = attention_with_lse(q_heads, k_full, v_full, plan.global_layout, plan.global_layout, causal, scale)
        return out
    raise ValueError(f"unknown kv_mode {kv_mode!r}; choose one of {', '.join(KV_MODES)}")


register(
    Strategy(
        "head_sharded",
        "SGLang PR #1436's layout: Q by heads over all tokens, K/V by sequence around a ring",
        entry_point="seqpar.head_sharded_attention(q_heads, k, v, plan, group) (Q by heads, not sequence shards)",
    )
)
