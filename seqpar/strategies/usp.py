"""USP: Ulysses x ring on a 2-D mesh (ulysses_degree * ring_degree == W).

Ranks r = ring_idx * U + u_idx. Inside each ulysses group (U adjacent ranks) an
all-to-all trades sequence shards for head shards; the U members' tokens form one
super-shard. Ranks with the same u_idx hold the same heads of different
super-shards, and run pass-KV ring attention among themselves. A second
all-to-all restores sequence sharding.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import group_rank, group_size
from seqpar.comm.mesh import UlyssesRingMesh
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.registry import Strategy, register
from seqpar.strategies.ring import ring_core
from seqpar.strategies.ulysses import head_to_seq, seq_to_head


def usp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: ShardPlan,
    group: dist.ProcessGroup | None,
    causal: bool = True,
    scale: float | None = None,
    ulysses_degree: int | None = None,
    mesh: UlyssesRingMesh | None = None,
) -> Tensor:
    world = group_size(group)
    if mesh is None:
        if ulysses_degree is None:
            raise ValueError(f"usp needs ulysses_degree (a divisor of the {world} ranks) or a prebuilt UlyssesRingMesh")
        mesh = UlyssesRingMesh.build(group, ulysses_degree)
    u = mesh.ulysses_degree
    ring_idx = group_rank(group) // u
    counts = [plan.local_counts[ring_idx * u + m] for m in range(u)]
    q_h, k_h, v_h = seq_to_head(q, k, v, counts, mesh.ulysses_group)
    # Ring member r's block is the super-shard of ranks r U .. r U + U - 1, in member order.
    layouts = [plan.group_layout(tuple(range(r * u, (r + 1) * u))) for r in range(mesh.ring_degree)]
    out, _ = ring_core(q_h, k_h, v_h, layouts[ring_idx], layouts, mesh.ring_group, causal, scale)
    return head_to_seq(out.to(q.dtype), counts, mesh.ulysses_group)


register(
    Strategy(
        "usp",
        "USP: Ulysses inside groups of ulysses_degree ranks, a ring across them",
        whole=usp_attention,
        options=("ulysses_degree",),
        heads_divide_degree=True,
    )
)
