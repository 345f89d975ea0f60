"""Ulysses: all-to-all from sequence shards to head shards, full attention, and back.

Before: rank r holds its T_r tokens with all heads. After the first all-to-all,
rank j holds every token with q heads [j hq, (j + 1) hq), hq = Hq / W, and the
K/V heads those q heads read. Attention is then local and complete; a second
all-to-all returns each rank its own tokens with all heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import all_to_all, group_rank, group_size
from seqpar.kernels.attention import attention_with_lse
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.pricing import Cost, LayoutLayer
from seqpar.strategies.registry import Strategy, register


def kv_heads_for(num_q_heads: int, num_kv_heads: int, degree: int, j: int) -> list[int]:
    """KV heads that rank j's q head slice reads, such that local q head i reads local kv head i // (hq / n).

    hq = Hq / degree q heads per rank. When the slice covers whole GQA groups this
    is their kv heads; when kv heads are fewer than the degree several ranks share
    (replicate) one kv head; when a slice straddles groups unevenly, kv heads are
    repeated per q head.
    """
    if num_q_heads % degree != 0:
        raise ValueError(
            f"ulysses needs the number of q heads ({num_q_heads}) to be divisible by the ulysses degree ({degree}); "
            f"use a degree that divides {num_q_heads}, or the ring strategy"
        )
    hq, group = num_q_heads // degree, num_q_heads // num_kv_heads
    per_q = [(j * hq + i) // group for i in range(hq)]
    distinct = sorted(set(per_q))
    if hq % len(distinct) == 0 and per_q == [distinct[i // (hq // len(distinct))] for i in range(hq)]:
        return distinct
    return per_q


def seq_to_head(
    q: Tensor, k: Tensor, v: Tensor, counts: list[int], group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor]:
    """q [T_r, Hq, D], k/v [T_r, Hkv, D] -> q [T, hq, D], k/v [T, hkv, D]: all members' tokens in member order."""
    world, rank = group_size(group), group_rank(group)
    hq_total, hkv_total, d = q.shape[1], k.shape[1], q.shape[2]
    hq = hq_total // world
    sends = []
    for j in range(world):
        kv_idx = kv_heads_for(hq_total, hkv_total, world, j)
        # [T_r, hq + 2 hkv_j, D]: q, k and v of one destination in one message
        sends.append(torch.cat([q[:, j * hq : (j + 1) * hq], k[:, kv_idx], v[:, kv_idx]], dim=1))
    hkv = len(kv_heads_for(hq_total, hkv_total, world, rank))
    recv = all_to_all(sends, [(counts[j], hq + 2 * hkv, d) for j in range(world)], group)
    full = torch.cat(recv)  # [T, hq + 2 hkv, D]
    return full[:, :hq], full[:, hq : hq + hkv], full[:, hq + hkv :]


def head_to_seq(out: Tensor, counts: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """out [T, hq, D] in member order -> [T_r, Hq, D] for this rank's tokens."""
    world, rank = group_size(group), group_rank(group)
    hq, d = out.shape[1], out.shape[2]
    sends = list(out.split(list(counts)))
    recv = all_to_all(sends, [(counts[rank], hq, d)] * world, group)
    return torch.cat(recv, dim=1)  # heads of rank 0, then rank 1, ...: [T_r, Hq, D]


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: ShardPlan,
    group: dist.ProcessGroup | None,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    counts = list(plan.local_counts)
    q_h, k_h, v_h = seq_to_head(q, k, v, counts, group)
    # Reorder rank order -> packed order: one contiguous run per sequence, one causal kernel call each.
    inv = plan.inverse_rank_order.to(q.device)
    out, _ = attention_with_lse(q_h[inv], k_h[inv], v_h[inv], plan.global_layout, plan.global_layout, causal, scale)
    return head_to_seq(out[plan.rank_order.to(q.device)], counts, group)


# ---- cost ------------------------------------------------------------------------------------
def ulysses_bytes(counts: Sequence[int], rank: int, hq_total: int, hkv_total: int, d: int, b: int) -> int:
    """Ulysses: q, k, v head slices to every other rank, then the output head slices back. KV heads
    fewer than the degree are replicated (`kv_heads_for`), which costs bytes."""
    w = len(counts)
    hq = hq_total // w
    out = sum(
        counts[rank] * (hq + 2 * len(kv_heads_for(hq_total, hkv_total, w, j))) * d * b for j in range(w) if j != rank
    )
    back = sum(counts[j] * hq * d * b for j in range(w) if j != rank)
    return out + back


def _layout_s(x: LayoutLayer) -> float:
    counts = [x.tokens_local] * x.cp
    return ulysses_bytes(counts, 0, x.hq, x.hkv, x.d, x.b) / x.bandwidth + 2 * x.latency + x.attention_s


register(
    Strategy(
        "ulysses",
        "Ulysses: all-to-all swaps sequence shards for head shards, local attention, all-to-all back",
        whole=ulysses_attention,
        heads_divide_degree=True,
        cost=Cost(ulysses_bytes, layout_s=_layout_s),  # not over a cache: `seqpar plan` only
    )
)
