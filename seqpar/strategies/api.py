"""One entry point for every sequence-parallel prefill strategy.

All strategies share one signature: rank-local q [T_local, Hq, D] and k, v
[T_local, Hkv, D] holding the tokens `plan.local_indices(rank)` names, in that
order; they return out [T_local, Hq, D], the exact attention of those queries over
their whole sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import group_size
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.allgather import allgather_attention
from seqpar.strategies.pass_q import pass_q_attention
from seqpar.strategies.ring import ring_attention
from seqpar.strategies.ulysses import ulysses_attention
from seqpar.strategies.usp import usp_attention

STRATEGIES: dict[str, Callable[..., Tensor]] = {
    "ring": ring_attention,
    "pass_q": pass_q_attention,
    "allgather": allgather_attention,
    "ulysses": ulysses_attention,
    "usp": usp_attention,
}


def sp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    plan: ShardPlan,
    group: dist.ProcessGroup | None,
    strategy: str = "ring",
    causal: bool = True,
    scale: float | None = None,
    ulysses_degree: int | None = None,
) -> Tensor:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    world = group_size(group)
    if plan.world_size != world:
        raise ValueError(
            f"the plan shards over {plan.world_size} ranks but the group has {world}; "
            f"build the plan with world_size={world}"
        )
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    if q.shape[0] != plan.local_counts[rank] or k.shape[0] != q.shape[0] or v.shape != k.shape:
        raise ValueError(
            f"rank {rank} holds {plan.local_counts[rank]} tokens under {plan}; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)} (pass q[idx], k[idx], v[idx] with idx = plan.local_indices(rank))"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if strategy == "usp":
        return usp_attention(q, k, v, plan, group, causal, scale, ulysses_degree=ulysses_degree)
    if ulysses_degree is not None:
        raise ValueError(f"ulysses_degree is only used by strategy='usp' (got strategy={strategy!r})")
    return STRATEGIES[strategy](q, k, v, plan, group, causal, scale)
