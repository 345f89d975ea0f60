"""One entry point for every sequence-parallel prefill strategy.

All strategies share one signature: rank-local q [T_local, Hq, D] and k, v
[T_local, Hkv, D] holding the tokens `plan.local_indices(rank)` names, in that
order; they return out [T_local, Hq, D], the exact attention of those queries over
their whole sequences.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import group_size
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.registry import get, strategies, whole_prompt_names

# The strategies sp_attention runs, from the registry (each declared in its own module).
STRATEGIES: tuple[str, ...] = whole_prompt_names()


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
    chosen = get(strategy)  # ValueError naming the choices
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
    options = {"ulysses_degree": ulysses_degree} if ulysses_degree is not None else {}
    unused = sorted(set(options) - set(chosen.options))
    if unused:
        users = [n for n, s in strategies().items() if unused[0] in s.options]
        raise ValueError(f"{unused[0]} is only used by strategy={'/'.join(users)} (got strategy={strategy!r})")
    return chosen.whole(q, k, v, plan, group, causal, scale, **options)
