"""Named process groups, built once and passed explicitly.

`ParallelMesh` lays ranks out as [sp, tp] (tp fastest, so TP peers are adjacent
ranks on one node) and builds one group per row and column; `UlyssesRingMesh`
splits an SP group into ulysses (adjacent ranks, where all-to-all is cheapest) x ring.
Groups are created with `use_local_synchronization`, so only their members take
part: a mesh can be built inside any subgroup without involving the other ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _new_group(ranks: list[int]) -> dist.ProcessGroup:
    # Locally synchronised groups are named by a hash of their ranks, so the same
    # ranks must map to one group per process: create each once, then reuse it.
    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(ranks, use_local_synchronization=True)
    return _GROUPS[key]


def _member_groups(layout: list[list[int]], me: int) -> dist.ProcessGroup:
    """Create the group of `layout` that contains global rank `me`."""
    for ranks in layout:
        if me in ranks:
            return _new_group(ranks)
    raise ValueError(f"rank {me} is in none of {layout}")


@dataclass(frozen=True)
class ParallelMesh:
    """sp x tp over the ranks of `group`: sp shards tokens, tp shards weights."""

    sp_size: int
    tp_size: int
    sp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    sp_rank: int
    tp_rank: int

    @staticmethod
    def build(sp_size: int, tp_size: int, group: dist.ProcessGroup | None = None) -> ParallelMesh:
        world = dist.get_world_size(group)
        if sp_size * tp_size != world:
            raise ValueError(f"sp_size ({sp_size}) x tp_size ({tp_size}) must equal the number of ranks ({world})")
        members = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        me = dist.get_rank()
        local = members.index(me)
        sp_rank, tp_rank = divmod(local, tp_size)
        tp_layout = [[members[s * tp_size + t] for t in range(tp_size)] for s in range(sp_size)]
        sp_layout = [[members[s * tp_size + t] for s in range(sp_size)] for t in range(tp_size)]
        return ParallelMesh(
            sp_size, tp_size, _member_groups(sp_layout, me), _member_groups(tp_layout, me), sp_rank, tp_rank
        )


@dataclass(frozen=True)
class UlyssesRingMesh:
    """An SP group of W ranks as ulysses_degree x ring_degree; rank = ring_idx * U + ulysses_idx."""

    ulysses_degree: int
    ring_degree: int
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup

    @staticmethod
    def build(group: dist.ProcessGroup | None, ulysses_degree: int) -> UlyssesRingMesh:
        world = dist.get_world_size(group)
        if ulysses_degree < 1 or world % ulysses_degree != 0:
            raise ValueError(
                f"usp needs ulysses_degree to divide the group size: {world} ranks, ulysses_degree={ulysses_degree}; "
                f"choose one of {[d for d in range(1, world + 1) if world % d == 0]}"
            )
        ring = world // ulysses_degree
        members = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        me = dist.get_rank()
        u_layout = [[members[r * ulysses_degree + u] for u in range(ulysses_degree)] for r in range(ring)]
        r_layout = [[members[r * ulysses_degree + u] for r in range(ring)] for u in range(ulysses_degree)]
        return UlyssesRingMesh(ulysses_degree, ring, _member_groups(u_layout, me), _member_groups(r_layout, me))
