"""Where each row of a packed ragged tensor sits in its sequence.

A rank's shard of a batch holds, for every sequence, some tokens at some global
positions (contiguous chunks, zigzag chunk pairs, every N-th token when striped,
round-robin decode tokens). The kernels need that as *runs*: maximal stretches of
rows from one sequence whose positions step by a constant stride. Within a run
the causal mask between a query run and a key run of the same stride is a shifted
triangle in row/column space, so each pair is at most one fully visible block plus
one square causal block: both are what the fused kernels compute fastest.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Run:
    start: int  # first row of the run in the K/V (or Q) tensor it indexes
    length: int
    seq: int  # sequence id (index into the batch)
    pos: int  # global position of the first row
    stride: int  # position step between consecutive rows (1 when length == 1)


def _find_runs(seq_ids: list[int], positions: list[int], rows: list[int] | None = None) -> list[Run]:
    runs: list[Run] = []
    start = 0
    n = len(seq_ids)
    while start < n:
        end = start + 1
        stride = 1
        if end < n and seq_ids[end] == seq_ids[start] and positions[end] > positions[start]:
            stride = positions[end] - positions[start]
            while (
                end < n
                and seq_ids[end] == seq_ids[start]
                and positions[end] - positions[end - 1] == stride
                and (rows is None or rows[end] == rows[end - 1] + 1)
            ):
                end += 1
        runs.append(Run(start if rows is None else rows[start], end - start, seq_ids[start], positions[start], stride))
        start = end
    return runs


@dataclass(frozen=True)
class TokenLayout:
    """Sequence ids and global positions of the rows of a packed tensor.

    seq_ids: [T] int64, positions: [T] int64. Built once per shard and reused by
    every layer and every ring step. Token i sits in row i of the tensor, unless
    `rows` says otherwise: a paged KV cache passes each token's slot, so the kernels
    read the runs straight out of the cache storage (runs also break where the
    slots do), and never copy the cached K/V into a packed tensor.
    """

    seq_ids: Tensor
    positions: Tensor
    runs: tuple[Run, ...]
    by_seq: dict[int, tuple[Run, ...]] = field(repr=False)

    @staticmethod
    def build(
        seq_ids: Tensor | list[int], positions: Tensor | list[int], rows: Tensor | list[int] | None = None
    ) -> TokenLayout:
        seq_t = torch.as_tensor(seq_ids, dtype=torch.long).reshape(-1)
        pos_t = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if seq_t.numel() != pos_t.numel() or (rows is not None and len(rows) != seq_t.numel()):
            raise ValueError(
                f"seq_ids has {seq_t.numel()} entries, positions {pos_t.numel()}"
                + ("" if rows is None else f", rows {len(rows)}")
                + "; give one sequence id and one position (and row) per token"
            )
        row_list = None if rows is None else torch.as_tensor(rows, dtype=torch.long).reshape(-1).tolist()
        runs = _find_runs(seq_t.tolist(), pos_t.tolist(), row_list)
        groups: dict[int, list[Run]] = defaultdict(list)
        for r in runs:
            groups[r.seq].append(r)
        return TokenLayout(seq_t, pos_t, tuple(runs), {s: tuple(rs) for s, rs in groups.items()})

    @staticmethod
    def from_runs(runs: list[Run]) -> TokenLayout:
        """A layout straight from its runs (O(runs) Python; the per-token tensors are built by torch).

        Used where runs are known in bulk, e.g. whole KV blocks of a paged cache, so a step over a
        long context never loops over its tokens in Python.
        """
        lengths = torch.tensor([r.length for r in runs], dtype=torch.long)
        seq_t = torch.repeat_interleave(torch.tensor([r.seq for r in runs], dtype=torch.long), lengths)
        first = torch.repeat_interleave(torch.tensor([r.pos for r in runs], dtype=torch.long), lengths)
        stride = torch.repeat_interleave(torch.tensor([r.stride for r in runs], dtype=torch.long), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
        groups: dict[int, list[Run]] = defaultdict(list)
        for r in runs:
            groups[r.seq].append(r)
        return TokenLayout(seq_t, first + stride * within, tuple(runs), {s: tuple(rs) for s, rs in groups.items()})

    def shifted(self, offset: int) -> TokenLayout:
        """The same tokens, their rows moved by `offset` (a part placed after others in a concatenation)."""
        runs = [Run(r.start + offset, r.length, r.seq, r.pos, r.stride) for r in self.runs]
        return TokenLayout(
            self.seq_ids,
            self.positions,
            tuple(runs),
            {
                s: tuple(Run(r.start + offset, r.length, r.seq, r.pos, r.stride) for r in rs)
                for s, rs in self.by_seq.items()
            },
        )

    @staticmethod
    def concat(layouts: list[TokenLayout]) -> TokenLayout:
        """Rows of several layouts stacked in order (e.g. K/V gathered from all ranks)."""
        if not layouts:
            return TokenLayout.build([], [])
        return TokenLayout.build(
            torch.cat([lay.seq_ids for lay in layouts]), torch.cat([lay.positions for lay in layouts])
        )

    def ascending_span(self, seq: int) -> tuple[int, int] | None:
        """(first row, end row) if sequence `seq` fills one contiguous row range with strictly
        increasing positions (a zigzag shard's two chunks, say), else None."""
        runs = self.by_seq.get(seq, ())
        if not runs:
            return None
        for prev, run in zip(runs, runs[1:]):
            last = prev.pos + prev.stride * (prev.length - 1)
            if run.start != prev.start + prev.length or run.pos <= last:
                return None
        return runs[0].start, runs[-1].start + runs[-1].length

    def __len__(self) -> int:
        return int(self.seq_ids.numel())
