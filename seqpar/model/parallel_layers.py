"""Tensor-parallel linear layers and the rule that assigns attention heads to ranks.

Both layers are cut from a full nn.Linear after loading, so weight files never need to
know about parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from seqpar.comm.collectives import sum_over


class ColumnParallelLinear(nn.Module):
    """Keeps the output features `rows` of a full linear: [T, in] -> [T, len(rows)].
    No communication: the output stays sharded by feature (by head for q/k/v)."""

    def __init__(self, full: nn.Linear, rows: Sequence[int]) -> None:
        super().__init__()
        index = torch.as_tensor(list(rows), dtype=torch.long, device=full.weight.device)
        self.weight = nn.Parameter(full.weight.detach()[index].clone(), requires_grad=False)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach()[index].clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Keeps the input features `cols` of a full linear and sums the partial products over
    `group`: [T, len(cols)] -> [T, out], the same on every rank."""

    def __init__(self, full: nn.Linear, cols: Sequence[int], group: dist.ProcessGroup) -> None:
        super().__init__()
        index = torch.as_tensor(list(cols), dtype=torch.long, device=full.weight.device)
        self.weight = nn.Parameter(full.weight.detach()[:, index].clone(), requires_grad=False)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone(), requires_grad=False)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)
        sum_over(out, self.group)
        # Added after the reduce: before it, each rank's copy would be summed world times.
        return out if self.bias is None else out + self.bias


def head_shard(num_heads: int, num_kv_heads: int, world: int, rank: int) -> tuple[list[int], list[int]]:
    """Global (q_head_ids, kv_head_ids) that `rank` of `world` computes.

    Invariant: local q head i reads local kv head i // (len(q) // len(kv)), i.e. plain
    GQA on the local shard, so any attention works on it unchanged. Every q head is on
    exactly one rank; kv heads are replicated only as much as needed.

    Rule: split the kv heads into a = gcd(num_kv_heads, world) blocks and each KV group's
    q heads into b = world // a slices; rank r takes kv block r // b and slice r % b of each
    of those groups. a = world is plain TP (contiguous heads); a = 1 is the head-sharded layout
    (all kv heads, group_size // world q heads of every group). A valid assignment needs
    b | group_size; a = gcd gives the smallest b, so if it fails none exists.
    """
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of size {world}")
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    group_size = num_heads // num_kv_heads
    kv_blocks = math.gcd(num_kv_heads, world)
    q_slices = world // kv_blocks
    if group_size % q_slices != 0:
        raise ValueError(
            f"cannot shard {num_heads} q heads / {num_kv_heads} kv heads over {world} ranks: "
            f"after splitting kv heads {kv_blocks} ways, the {group_size} q heads of each KV group "
            f"must split {q_slices} ways; use a world size w with num_kv_heads % w == 0 or "
            f"(num_heads // num_kv_heads) % (w // gcd(num_kv_heads, w)) == 0"
        )
    kv_per_rank, q_per_group = num_kv_heads // kv_blocks, group_size // q_slices
    block, piece = divmod(rank, q_slices)
    kv_ids = list(range(block * kv_per_rank, (block + 1) * kv_per_rank))
    q_ids = [kv * group_size + piece * q_per_group + j for kv in kv_ids for j in range(q_per_group)]
    return q_ids, kv_ids


def head_rows(head_ids: Sequence[int], head_dim: int) -> list[int]:
    """Feature indices (rows of q/k/v weights, columns of o_proj) of the given heads."""
    return [h * head_dim + d for h in head_ids for d in range(head_dim)]
