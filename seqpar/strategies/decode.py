"""Decode over a KV cache sharded by sequence: attend locally, merge partials by LSE.

Every rank attends the new tokens' queries over the cached K/V it holds, giving a
partial (out, lse) per query and head. Three exact merges:
- allgather: every rank gathers all W partials and merges them: W (D + 1) floats
  per query head cross the wire to each rank; every rank ends with all heads.
- alltoall: rank j receives only the partials of its head slice (Hq / W heads)
  and merges those: 1/W of the traffic and merge work; ends head-sharded, which is
  what a row-parallel o_proj wants (the seed's noted improvement).
- tree: all-reduce the max of the LSE, then all-reduce the sum of
  exp(lse - max) * out and of exp(lse - max) (Tree Attention): two reductions of
  fixed size, whatever W is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import all_gather_uneven, all_reduce, all_to_all, group_rank, group_size
from seqpar.kernels.attention import attend_into, new_accumulators
from seqpar.kernels.layout import TokenLayout
from seqpar.kernels.merge import merge_many

MERGES = ("allgather", "alltoall", "tree")


def local_partial(q: Tensor, k: Tensor, v: Tensor, q_layout: TokenLayout, k_layout: TokenLayout, scale: float | None) -> tuple[Tensor, Tensor]:
    out, lse = new_accumulators(q)
    attend_into(out, lse, q, k, v, q_layout, k_layout, True, scale)
    return out, lse


def merge_partials(out: Tensor, lse: Tensor, group: dist.ProcessGroup | None, merge: str) -> Tensor:
    """out [B, Hq, D] fp32, lse [B, Hq] -> merged [B, Hq, D] (alltoall: [B, Hq / W, D], this rank's heads)."""
    world, rank = group_size(group), group_rank(group)
    b, hq, d = out.shape
    if merge == "allgather":
        packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)  # [B, Hq, D + 1]
        parts = torch.stack(all_gather_uneven(packed, [b] * world, group))  # [W, B, Hq, D + 1]
        return merge_many(parts[..., :d], parts[..., d])[0]
    if merge == "alltoall":
        if hq % world != 0:
            raise ValueError(f"the alltoall decode merge needs q heads ({hq}) divisible by the group size ({world}); use 'allgather' or 'tree'")
        packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)
        sends = [p.contiguous() for p in packed.chunk(world, dim=1)]  # W x [B, Hq / W, D + 1]
        parts = torch.stack(all_to_all(sends, [(b, hq // world, d + 1)] * world, group))
        return merge_many(parts[..., :d], parts[..., d])[0]
    if merge == "tree":
        m = all_reduce(lse.clone(), group, dist.ReduceOp.MAX)  # [B, Hq]
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # no key anywhere: weights 0, out 0
        w = torch.exp(lse - m)  # [B, Hq]
        acc = all_reduce(torch.cat([out * w.unsqueeze(-1), w.unsqueeze(-1)], dim=-1), group)  # [B, Hq, D + 1]
        den = acc[..., d:]
        return acc[..., :d] / torch.where(den > 0, den, torch.ones_like(den))
    raise ValueError(f"unknown decode merge {merge!r}; choose one of {', '.join(MERGES)}")


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, q_layout: TokenLayout, k_layout: TokenLayout,
    group: dist.ProcessGroup | None, merge: str = "allgather", scale: float | None = None,
    q_head_sharded: bool = False,
) -> Tensor:
    """Exact attention of q [B, Hq, D] over K/V sharded by sequence (k, v [L_local, Hkv, D] here).

    q is replicated on every rank, or with q_head_sharded=True each rank passes its
    Hq / W heads and they are all-gathered first (the seed's decode). Positions in
    the layouts make the step causal, so a cache may also hold other sequences' tokens.
    """
    if q_head_sharded:
        q = torch.cat(_gather_heads(q, group), dim=1)  # W x [B, Hq / W, D] -> [B, Hq, D]
    out, lse = local_partial(q, k, v, q_layout, k_layout, scale)
    return merge_partials(out, lse, group, merge).to(q.dtype)


def _gather_heads(q: Tensor, group: dist.ProcessGroup | None) -> list[Tensor]:
    return all_gather_uneven(q.contiguous(), [q.shape[0]] * group_size(group), group)
