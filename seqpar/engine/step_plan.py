"""Where a step's rows and keys are, on every rank, derived from the driver's message alone.

Decode rows (one new token of a generating sequence) are replicated on every SP rank; their keys
are every cached position of the sequence on this rank, all visible to its one query. Prefill rows
(a chunk of a prompt) are sharded by position (`Placement`): rank r computes the new positions it
owns; their keys are every rank's cached positions of the sequence, as runs over storage slots
(read in place) and packed (the order a pass-KV message carries them).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from seqpar.engine.messages import SeqStep, Step
from seqpar.engine.placement import Placement, blocks_needed
from seqpar.kernels.layout import Run, TokenLayout
from seqpar.strategies.over_cache import CachedKeys, slot_ranges


def _append(runs: list[Run], run: Run) -> None:
    """Add a run, joining it to the last one when rows and positions both continue."""
    last = runs[-1] if runs else None
    if (
        last is not None
        and last.seq == run.seq
        and last.start + last.length == run.start
        and last.pos + last.length == run.pos
    ):
        runs[-1] = Run(last.start, last.length + run.length, run.seq, last.pos, 1)
    else:
        runs.append(run)


def _slots(runs: list[Run]) -> Tensor:
    """The storage slots of runs, in order: an arange a run for a few runs; for many (a row's blocks
    scattered over storage are a run each), key i of a run starting at slot a, after c keys of
    earlier runs, sits at i + (a - c): one arange and one repeat. 32 rows x 129 scattered blocks took
    5.5 ms with an arange a run, 1.5 ms so; 2 runs a row, 4.2 us against 11.6 (one thread, a Xeon)."""
    if not runs:
        return torch.empty(0, dtype=torch.long)
    if len(runs) <= 8:
        return torch.cat([torch.arange(r.start, r.start + r.length) for r in runs])
    lengths, shift, seen = [], [], 0
    for r in runs:
        lengths.append(r.length)
        shift.append(r.start - seen)
        seen += r.length
    return torch.arange(seen) + torch.tensor(shift).repeat_interleave(torch.tensor(lengths), output_size=seen)


def _merged(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive [a, b] intervals, sorted and joined where they overlap or touch."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _within(runs: list[Run], reach: list[list[tuple[int, int]]]) -> list[Run]:
    """The parts of key runs (of stride 1; run.seq indexes `reach`) inside their sequence's intervals."""
    kept = []
    for r in runs:
        for a, b in reach[r.seq]:
            lo, hi = max(a, r.pos), min(b, r.pos + r.length - 1)
            if lo <= hi:
                kept.append(Run(r.start + lo - r.pos, hi - lo + 1, r.seq, lo, 1))
    return kept


def _cached_keys(k_runs: list[list[Run]], me: int) -> CachedKeys:
    """Every rank's cached key runs (storage slots) as the strategies read them."""
    packed = []
    for runs in k_runs:
        # Packed rows are consecutive, so blocks scattered in storage join into one run per
        # stretch of consecutive positions.
        joined: list[Run] = []
        row = 0
        for r in runs:
            _append(joined, Run(row, r.length, r.seq, r.pos, 1))
            row += r.length
        packed.append(TokenLayout.from_runs(joined))
    return CachedKeys([TokenLayout.from_runs(r) for r in k_runs], packed, slot_ranges(k_runs[me]))


class StepPlan:
    """Where this step's rows and keys are, on every rank (built from the message alone)."""

    def __init__(self, msg: Step, placement: Placement, me: int, group: int = 0) -> None:
        """The plan of layer group `group`'s blocks (`KVGroups`): the rows are every group's, the slots
        its own; a window group's freed blocks (-1) hold no keys."""
        world, bs = placement.sp_size, placement.block_size
        self.decode = [s for s in msg.seqs if s.decode]
        self.prefill = [s for s in msg.seqs if not s.decode]
        # Decode rows: queries replicated; keys are every cached position of the sequence on this
        # rank, all visible to its one query, as the storage slots of each row (the CPU's DecodeBatch;
        # the GPU's block table is `decode_table`).
        self.placement, self.me, self.group = placement, me, group
        write_rows, write_slots = [], []
        for j, s in enumerate(self.decode):
            if placement.owner(s.start // bs) == me:
                write_rows.append(j)
                write_slots.append(s.blocks[group][s.start // bs] * bs + s.start % bs)
        # Prefill rows: rank r computes the new positions it owns (rows in sequence order).
        q_runs: list[list[Run]] = [[] for _ in range(world)]
        k_runs: list[list[Run]] = [[] for _ in range(world)]
        rows = [0] * world
        self.ids: list[int] = [s.token_ids[0] for s in self.decode]
        positions = [torch.tensor([s.start for s in self.decode], dtype=torch.long)]
        self.prefill_rows: list[tuple[SeqStep, Tensor]] = []  # (seq, its local rows' positions)
        local_rows = len(self.decode)
        for j, s in enumerate(self.prefill):
            end = s.start + len(s.token_ids)
            local = []
            for r, stretches in enumerate(placement.token_runs(s.start, end)):
                for p, n in stretches:
                    _append(q_runs[r], Run(rows[r], n, j, p, 1))
                    rows[r] += n
                    if r == me:
                        local.append(torch.arange(p, p + n))
                        self.ids += s.token_ids[p - s.start : p - s.start + n]
            for r, runs in enumerate(placement.key_runs(s.blocks[group], end, j)):
                k_runs[r].extend(runs)
            pos = torch.cat(local) if local else torch.empty(0, dtype=torch.long)
            positions.append(pos)
            self.prefill_rows.append((s, pos))
            table = torch.tensor(s.blocks[group], dtype=torch.long)
            write_rows += range(local_rows, local_rows + len(pos))
            local_rows += len(pos)
            write_slots += (table[pos // bs] * bs + pos % bs).tolist()
        self.positions = torch.cat(positions)
        self.write_rows = torch.tensor(write_rows, dtype=torch.long)
        self.write_slots = torch.tensor(write_slots, dtype=torch.long)
        if not self.prefill:  # a decode-only step needs none of the prefill layouts
            return
        self.q_layouts = [TokenLayout.from_runs(r) for r in q_runs]
        self.k_runs = k_runs
        self.keys = _cached_keys(k_runs, me)
        self._window_keys: dict[int, CachedKeys] = {}

    def keys_within(self, window: int) -> CachedKeys:
        """`keys` of a sliding-window layer: only the cached keys some query of the step can see. A
        rank attends in place those its own queries or others' can see, and sends only those the other
        ranks' queries can see: where no query's window crosses into another rank's keys, no K/V moves."""
        if window not in self._window_keys:
            # per rank, per sequence: the positions its queries' windows cover, as merged intervals
            reach: list[dict[int, list[tuple[int, int]]]] = []
            for lay in self.q_layouts:
                spans: dict[int, list[tuple[int, int]]] = {}
                for q in lay.runs:
                    spans.setdefault(q.seq, []).append((q.pos - window + 1, q.pos + (q.length - 1) * q.stride))
                reach.append({j: _merged(iv) for j, iv in spans.items()})
            union = [_merged([iv for r in reach for iv in r.get(j, [])]) for j in range(len(self.prefill))]
            local, sent = [], []
            for me, runs in enumerate(self.k_runs):
                others = [
                    _merged([iv for r, by in enumerate(reach) if r != me for iv in by.get(j, [])])
                    for j in range(len(self.prefill))
                ]
                local.append(_within(runs, union))
                sent.append(_within(runs, others))
            keys = _cached_keys(sent, self.me)
            self._window_keys[window] = CachedKeys(
                [TokenLayout.from_runs(r) for r in local], keys.packed, keys.slot_ranges, local_in_place=True
            )
        return self._window_keys[window]

    @cached_property
    def decode_runs(self) -> list[list[Run]]:
        """Each decode row's keys on this rank as runs over storage slots, with their positions.
        Built on first use (the CPU's decode; the GPU's reads `decode_table`)."""
        return [
            self.placement.key_runs(s.blocks[self.group], s.start + 1, j)[self.me] for j, s in enumerate(self.decode)
        ]

    @cached_property
    def decode_slots(self) -> list[Tensor]:
        """Each decode row's key slots on this rank, in key order (the CPU's `DecodeBatch`)."""
        slots = []
        for j, mine in enumerate(self.decode_runs):
            runs: list[Run] = []  # runs adjacent in storage joined (positions no longer needed)
            for run in mine:
                last = runs[-1] if runs else None
                if last is not None and last.start + last.length == run.start:
                    runs[-1] = Run(last.start, last.length + run.length, j, last.pos, 1)
                else:
                    runs.append(run)
            slots.append(_slots(runs))
        return slots

    def decode_slots_within(self, window: int) -> list[Tensor]:
        """`decode_slots` of a sliding-window layer: each row's keys at positions (p - window, p] only
        (a rank that holds none of them has no key for the row: lse -inf, out 0, its merge weight 0)."""
        reach = [[(s.start - window + 1, s.start)] for s in self.decode]  # row j's runs have seq j
        return [_slots(_within(runs, reach)) for runs in self.decode_runs]

    def decode_table(self, window: int | None = None) -> tuple[list[list[int]], list[int], list[int] | None]:
        """Each decode row's pages on this rank, in key order, and its key count there (the GPU's block
        table; only a sequence's last block is partial, so only a row's last page here can be). Built
        on demand: a loop over every block of every row, which the CPU's decode never needs."""
        pages, lens, starts = [], [], []
        bs, unit, owner = self.placement.block_size, self.placement.shard_blocks, self.placement.owner
        for s in self.decode:
            n = blocks_needed(s.start + 1, bs)
            # this rank's blocks: whole shard units of `unit` blocks each (one owner call a unit)
            mine = [i for u in range(0, n, unit) if owner(u) == self.me for i in range(u, min(u + unit, n))]
            blocks = s.blocks[self.group]
            # a window group's freed blocks (-1) lie before every row's window: listed, never read
            pages.append([max(blocks[i], 0) for i in mine])
            # every block full but the sequence's last (n - 1), which holds s.start + 1 - (n - 1) * bs keys
            last = n - 1 in mine[-1:]
            lens.append((len(mine) - last) * bs + last * (s.start + 1 - (n - 1) * bs))
            if window is not None:  # the keys here before the row's window (positions <= p - window)
                first = s.start - window + 1
                starts.append(sum(min(bs, first - i * bs) for i in mine if i * bs < first))
        return pages, lens, starts if window is not None else None

    def to(self, device: torch.device) -> None:
        """Move what indexes the model's inputs and the cache to `device`. Layouts stay on the host:
        the kernels read only their runs (ints); prefill_rows' positions pick output rows there."""
        self.positions, self.write_rows, self.write_slots = (
            t.to(device) for t in (self.positions, self.write_rows, self.write_slots)
        )
