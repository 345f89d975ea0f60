"""How a ragged batch of sequences is split over the ranks of a sequence-parallel group.

Tokens are packed: sequence s occupies global rows [offsets[s], offsets[s] + seq_lens[s]).
Schemes (each sequence is split on its own, so any length works, including
lengths shorter than the world size, where some ranks hold none of it):
- contiguous: N near-equal chunks, rank i gets chunk i. Causal work is unbalanced:
  the last rank's queries see the most keys.
- zigzag: 2N near-equal chunks, rank i gets chunks i and 2N-1-i. An early chunk is
  paired with a late one, so causal work is balanced (exactly, when 2N divides L).
- striped: token t goes to rank t mod N. Balanced too, at the price of strided runs.
Within a rank, tokens keep sequence order, then position order of their chunks.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from seqpar.kernels.layout import TokenLayout

SCHEMES = ("contiguous", "zigzag", "striped")


def _chunks(length: int, parts: int) -> list[range]:
    """`parts` near-equal consecutive ranges covering [0, length); the first get the remainder."""
    base, extra = divmod(length, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _positions_for_rank(length: int, world: int, rank: int, scheme: str) -> list[int]:
    if scheme == "contiguous":
        return list(_chunks(length, world)[rank])
    if scheme == "zigzag":
        chunks = _chunks(length, 2 * world)
        return list(chunks[rank]) + list(chunks[2 * world - 1 - rank])
    return list(range(rank, length, world))  # striped


class ShardPlan:
    """Which packed tokens each rank of a `world_size` group holds.

    >>> plan = ShardPlan(seq_lens=[5, 3], world_size=2, scheme="zigzag")
    >>> plan.local_indices(0).tolist()  # global packed rows held by rank 0
    [0, 1, 4, 5]
    """

    def __init__(self, seq_lens: list[int] | tuple[int, ...], world_size: int, scheme: str = "zigzag"):
        seq_lens = tuple(int(n) for n in seq_lens)
        if not seq_lens or any(n < 1 for n in seq_lens):
            raise ValueError(f"seq_lens must be a non-empty list of positive lengths, got {list(seq_lens)}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown sharding scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        self.seq_lens = seq_lens
        self.world_size = world_size
        self.scheme = scheme
        offsets = [0]
        for n in seq_lens:
            offsets.append(offsets[-1] + n)
        self.offsets = tuple(offsets)
        self._seq: list[Tensor] = []
        self._pos: list[Tensor] = []
        for rank in range(world_size):
            seq, pos = [], []
            for s, n in enumerate(seq_lens):
                p = _positions_for_rank(n, world_size, rank, scheme)
                seq += [s] * len(p)
                pos += p
            self._seq.append(torch.tensor(seq, dtype=torch.long))
            self._pos.append(torch.tensor(pos, dtype=torch.long))
        self._layouts: dict[int, TokenLayout] = {}
        self._group_layouts: dict[tuple[int, ...], TokenLayout] = {}

    def __repr__(self) -> str:
        return f"ShardPlan(seq_lens={list(self.seq_lens)}, world_size={self.world_size}, scheme={self.scheme!r})"

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this plan's world of {self.world_size} ranks")

    def local_indices(self, rank: int) -> Tensor:
        """LongTensor [T_local]: the global packed rows this rank holds, in local order."""
        self._check_rank(rank)
        offsets = torch.tensor(self.offsets[:-1], dtype=torch.long)
        return offsets[self._seq[rank]] + self._pos[rank]

    def positions(self, rank: int) -> Tensor:
        """LongTensor [T_local]: each local token's position inside its sequence (for RoPE)."""
        self._check_rank(rank)
        return self._pos[rank]

    def seq_ids(self, rank: int) -> Tensor:
        self._check_rank(rank)
        return self._seq[rank]

    def num_local_tokens(self, rank: int) -> int:
        self._check_rank(rank)
        return int(self._seq[rank].numel())

    @cached_property
    def local_counts(self) -> tuple[int, ...]:
        return tuple(int(s.numel()) for s in self._seq)

    def layout(self, rank: int) -> TokenLayout:
        """Runs of this rank's tokens, built once and shared by every layer and ring step."""
        self._check_rank(rank)
        if rank not in self._layouts:
            self._layouts[rank] = TokenLayout.build(self._seq[rank], self._pos[rank])
        return self._layouts[rank]

    def group_layout(self, ranks: tuple[int, ...]) -> TokenLayout:
        """Layout of several ranks' tokens stacked in the given order (a gathered super-shard)."""
        if ranks not in self._group_layouts:
            self._group_layouts[ranks] = TokenLayout.concat([self.layout(r) for r in ranks])
        return self._group_layouts[ranks]

    @cached_property
    def global_layout(self) -> TokenLayout:
        """The whole batch in packed order: one stride-1 run per sequence."""
        seq = torch.repeat_interleave(torch.arange(len(self.seq_lens)), torch.tensor(self.seq_lens))
        pos = torch.cat([torch.arange(n) for n in self.seq_lens])
        return TokenLayout.build(seq, pos)

    @cached_property
    def rank_order(self) -> Tensor:
        """LongTensor [T]: global rows of rank 0's tokens, then rank 1's, ... (the order of a gather)."""
        return torch.cat([self.local_indices(r) for r in range(self.world_size)])

    @cached_property
    def inverse_rank_order(self) -> Tensor:
        """LongTensor [T]: where each global row sits in `rank_order` (gathered -> packed order)."""
        inv = torch.empty_like(self.rank_order)
        inv[self.rank_order] = torch.arange(self.total_tokens)
        return inv

    def shard(self, x: Tensor, rank: int) -> Tensor:
        """x [T, ...] in packed order -> this rank's rows [T_local, ...]."""
        return x[self.local_indices(rank).to(x.device)]

    def unshard(self, parts: list[Tensor]) -> Tensor:
        """Every rank's rows, in rank order, back to packed order [T, ...]."""
        if len(parts) != self.world_size:
            raise ValueError(f"unshard needs {self.world_size} parts (one per rank), got {len(parts)}")
        for r, p in enumerate(parts):
            if p.shape[0] != self.local_counts[r]:
                raise ValueError(f"rank {r}'s part has {p.shape[0]} rows; the plan gives it {self.local_counts[r]}")
        stacked = torch.cat(parts)
        return stacked[self.inverse_rank_order.to(stacked.device)]

    def causal_work(self, rank: int) -> int:
        """Query-key pairs this rank's queries attend to under a causal mask."""
        return int((self._pos[rank] + 1).sum())
