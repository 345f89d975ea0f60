"""All-gather K/V: every rank gathers the whole sequence's K/V, then attends locally.

No overlap is possible and K/V memory is not sharded during the call, but it is
one collective: the right choice for short or very ragged batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import all_gather_uneven, group_rank
from seqpar.comm.shm import HostExchange
from seqpar.kernels.attention import attend_into_head_major, attention_with_lse, new_accumulators
from seqpar.kernels.layout import TokenLayout
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.over_cache import CachedKeys, pack
from seqpar.strategies.pricing import Cost, LayoutLayer, StepLayer
from seqpar.strategies.registry import Strategy, register


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


def allgather_over_cache(
    q: Tensor,
    q_layouts: list[TokenLayout],
    kh: Tensor,
    vh: Tensor,
    keys: CachedKeys,
    group: dist.ProcessGroup | None,
    scale: float | None,
    exchange: HostExchange | None = None,
    window: int | None = None,
) -> Tensor:
    """All-gather over the cache: every rank gathers every rank's packed K/V, then attends locally."""
    rank = group_rank(group)
    hkv, d = kh.shape[0], kh.shape[2]
    mine = pack(kh, vh, keys).permute(2, 0, 1, 3).reshape(keys.num_local, 2 * hkv, d)  # [n, 2 Hkv, D]
    parts = all_gather_uneven(mine.contiguous(), [len(lay) for lay in keys.packed], group)
    layouts = list(keys.packed)
    out, lse = new_accumulators(q)
    if keys.local_in_place:  # this rank's own keys from its storage; its message only for the others
        attend_into_head_major(out, lse, q, kh, vh, q_layouts[rank], keys.in_storage[rank], True, scale, True, window)
        parts[rank], layouts[rank] = parts[rank][:0], TokenLayout.from_runs([])
    full = torch.cat(parts).transpose(0, 1).contiguous()  # [2 Hkv, sum n, D]
    offsets = torch.cumsum(torch.tensor([0] + [len(lay) for lay in layouts]), 0).tolist()
    runs = [run for lay, off in zip(layouts, offsets) for run in lay.shifted(off).runs]
    attend_into_head_major(
        out, lse, q, full[:hkv], full[hkv:], q_layouts[rank], TokenLayout.from_runs(runs), True, scale, window=window
    )
    return out


# ---- cost ------------------------------------------------------------------------------------
def allgather_bytes(counts: Sequence[int], hkv: int, d: int, b: int) -> int:
    """All-gather K/V: gloo needs equal parts, so the shard is padded to the largest and sent W - 1 times."""
    w = len(counts)
    return (w - 1) * max(counts) * 2 * hkv * d * b if w > 1 else 0


def _layout_s(x: LayoutLayer) -> float:
    counts = [x.tokens_local] * x.cp
    return allgather_bytes(counts, x.hkv, x.d, x.b) / x.bandwidth + (x.cp - 1) * x.latency + x.attention_s


def _step_s(x: StepLayer) -> float:
    """Pack, pad, gather, lay out; then one pass over every key."""
    w, hkv, d, b, copy_s, kc = x.world, x.hkv, x.d, x.b, x.copy_s, x.key_counts
    gather = x.links["all_gather"].seconds(allgather_bytes(kc, hkv, d, b)) if w > 1 else 0.0
    return (
        max(copy_s(2 * hkv * d * b * kc[r]) for r in range(w))
        + gather
        + copy_s(3 * 2 * hkv * d * b * sum(kc))  # pad, cat, transpose to head-major
        + max(sum(x.comp[r]) + copy_s(x.partial * x.query_counts[r]) for r in range(w))
    )


register(
    Strategy(
        "allgather",
        "all-gather KV: every rank gathers all K/V, then attends (no overlap)",
        whole=allgather_attention,
        over_cache=allgather_over_cache,
        cost=Cost(
            lambda counts, rank, hq, hkv, d, b: allgather_bytes(counts, hkv, d, b),
            layout_s=_layout_s,
            step_s=_step_s,
            tie_rank=2,
        ),
    )
)
