"""Deterministic attention over a KV cache sharded by sequence (`enable_deterministic_inference`).

Every query is computed in the canonical order of `seqpar.kernels.canonical`: one partial per
KV unit (a shard unit of the placement: it lives whole on one rank), merged left to right. The
unit is what no SP degree splits, so a row comes out with the same bits at SP 1-N, in a chunk of
any size, alone or in a batch, from a cached prefix or not.

- Prefill rows: every rank gathers every rank's cached K/V of the step's sequences (the
  all-gather's traffic; on one host through shared memory, as pass-KV does), then computes its
  own rows over the units in order. pass-Q would have to return one partial per unit and query
  instead of one per rank; here every strategy moves K/V alike.
- Decode rows (`DecodeUnits`, worked out once per step): each rank computes the partials of the
  units it holds, writes them in a table [units, B, Hq, D + 1] (other units: lse -inf), the
  tables are gathered (shared memory on one host), each unit is taken from its owner, and every
  rank merges them in order. The merge modes (allgather, alltoall, tree) all come down to that
  gather here: a sum over ranks is an order.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import all_gather_uneven, group_rank, group_size
from seqpar.comm.shm import HostExchange
from seqpar.kernels.canonical import OrderedMerge, attend_unit, merge_in_order, unit_mask, unit_partials
from seqpar.kernels.decode import strided_rows
from seqpar.strategies.decode import gather_parts
from seqpar.strategies.over_cache import CachedKeys, kv_message_shapes, pack


def _unit_view(part: Tensor, start: int, unit: int) -> tuple[Tensor, Tensor]:
    """Keys [start, start + unit) of a rank's message [2, Hkv, n, D]; rows before its start (a window
    layer's unit whose first blocks were freed) or past its end padded with zeros (finite: masked
    keys only add exact zeros)."""
    if 0 <= start and start + unit <= part.shape[2]:
        return part[0, :, start : start + unit], part[1, :, start : start + unit]
    pad = part.new_zeros(2, part.shape[1], unit, part.shape[3])
    a, b = max(0, start), min(part.shape[2], start + unit)
    pad[:, :, a - start : b - start] = part[:, :, a:b]
    return pad[0], pad[1]


def prefill(
    q: Tensor,
    rows: list[tuple[int, Tensor]],
    kh: Tensor,
    vh: Tensor,
    keys: CachedKeys,
    unit: int,
    group: dist.ProcessGroup | None,
    scale: float,
    exchange: HostExchange | None = None,
    window: int | None = None,
) -> Tensor:
    """This rank's prefill queries q [T_local, Hq, D] -> out [T_local, Hq, D] fp32.

    rows: per sequence (batch row j of `keys`), in q's order, (cached positions after the step,
    this rank's query positions ascending). window: a sliding-window layer's (a query at p sees
    keys (p - window, p]): the units before a row's window are not among its partials.
    """
    hkv, d = kh.shape[0], kh.shape[2]
    kv = pack(kh, vh, keys)  # [2, Hkv, n, D]
    shapes = kv_message_shapes(keys, hkv, d)
    if group_size(group) == 1:
        parts = [kv]
    elif exchange is not None and exchange.fits_parts(shapes, kv.dtype, kv.device):
        parts = exchange.all_gather_views(kv, shapes)
    else:
        mine = kv.permute(2, 0, 1, 3).reshape(kv.shape[2], 2 * hkv, d).contiguous()  # [n, 2 Hkv, D]
        got = all_gather_uneven(mine, [s[2] for s in shapes], group)
        parts = [p.view(-1, 2, hkv, d).permute(1, 2, 0, 3).contiguous() for p in got]  # [2, Hkv, n_r, D]
    parts[group_rank(group)] = kv
    where: dict[tuple[int, int], tuple[int, int]] = {}  # (seq, unit) -> (rank, first row in its message)
    for r, lay in enumerate(keys.packed):
        for run in lay.runs:
            # a unit's keys are one run (a window layer's may lack its first blocks: the run starts
            # inside the unit, and the unit's first row lies before it)
            for u in range(run.pos // unit, -(-(run.pos + run.length) // unit)):
                where.setdefault((run.seq, u), (r, run.start + u * unit - run.pos))
    merge = OrderedMerge(q.shape[0], q.shape[1], d, q.device)
    row = 0
    for j, (end, pos) in enumerate(rows):
        plist = pos.tolist()
        if plist:
            p = torch.tensor(plist)
            reach = 0 if window is None else max(0, plist[0] - window + 1)
            for u in range(reach // unit, plist[-1] // unit + 1):
                first = bisect_left(plist, u * unit)  # rows from here see unit u
                # ... up to those whose window starts past it
                last = len(plist) if window is None else bisect_right(plist, u * unit + unit + window - 2)
                r, start = where[(j, u)]
                k_u, v_u = _unit_view(parts[r], start, unit)
                vis = torch.clamp(p[first:last] - u * unit + 1, max=min(unit, end - u * unit))
                lo = None if window is None else torch.clamp(p[first:last] - window + 1 - u * unit, min=0)
                attend_unit(merge, row + first, q[row + first : row + last], vis, k_u, v_u, scale, lo)
        row += len(plist)
    return merge.result()


class DecodeUnits:
    """A decode step's deterministic attention, worked out once for all its layers.

    seqs[j]: (the new token's position p, the block table); keys [0, p] are cached, unit u on
    rank owner(u). This rank's units of every row go through one flash call per layer
    (`unit_partials`); which (row, unit) pairs those are, their keys' places in the cache, the
    mask and the owners are the same in every layer, so they are found here once. window: a
    sliding-window layer's: a row's units start at its window's (keys (p - window, p]; blocks
    before it may be freed, -1 in the table)."""

    def __init__(
        self,
        seqs: list[tuple[int, list[int]]],
        owner: Callable[[int], int],
        block_size: int,
        unit_blocks: int,
        group: dist.ProcessGroup | None,
        scale: float,
        exchange: HostExchange | None = None,
        window: int | None = None,
    ) -> None:
        self.unit = unit = block_size * unit_blocks
        self.block_size, self.group, self.scale, self.exchange = block_size, group, scale, exchange
        me, self.world = group_rank(group), group_size(group)
        self.b, self.n_units = len(seqs), max(p // unit + 1 for p, _ in seqs)
        rows, units, vis, los, tables = [], [], [], [], []
        for j, (p, blocks) in enumerate(seqs):
            reach = 0 if window is None else max(0, p - window + 1)
            for u in range(reach // unit, p // unit + 1):
                if owner(u) == me:
                    n_keys = min(unit, p + 1 - u * unit)
                    rows.append(j)
                    units.append(u)
                    vis.append(n_keys)
                    los.append(max(0, reach - u * unit))
                    # a freed block (before the window: masked) read as block 0
                    held = blocks[u * unit_blocks : u * unit_blocks + -(-n_keys // block_size)]
                    tables.append([max(b, 0) for b in held] if window is not None else held)
        self.rows, self.units, self.tables = rows, units, tables
        self.vis = torch.tensor(vis, dtype=torch.long)
        self.lo = torch.tensor(los, dtype=torch.long) if window is not None else None
        self.owners = [owner(u) for u in range(self.n_units)]
        self._keys: tuple | None = None  # (in place: (start, step)) or the slots to gather, at the first layer
        self._mask: dict[tuple, Tensor | None] = {}

    def _unit_keys(self, kh: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's units' keys [P, Hkv, unit, D] from the paged storage: a view in place when
        every unit's blocks are consecutive and the units evenly spaced (a sequence's units as
        allocated), else gathered (a short unit's missing slots: block 0's, masked)."""
        unit, bs, tables = self.unit, self.block_size, self.tables
        if self._keys is None:
            starts = [blocks[0] * bs for blocks in tables]
            step = starts[1] - starts[0] if len(starts) > 1 else unit
            in_place = step > 0 and starts[-1] + unit <= kh.shape[1]
            in_place = in_place and all(s == starts[0] + i * step for i, s in enumerate(starts))
            in_place = in_place and all(b == blocks[0] + i for blocks in tables for i, b in enumerate(blocks))
            if in_place:
                self._keys = ("view", starts[0], step)
            else:
                # Every unit's blocks padded with block 0 (masked) to a whole unit, expanded to slots.
                per_unit = -(-unit // bs)
                padded = torch.tensor([blocks + [0] * (per_unit - len(blocks)) for blocks in tables], dtype=torch.long)
                idx = (padded[:, :, None] * bs + torch.arange(bs)).view(len(tables), -1)[:, :unit]
                self._keys = ("gather", idx.flatten().to(kh.device))
        p, hkv, d = len(tables), kh.shape[0], kh.shape[2]
        if self._keys[0] == "view":
            _, start, step = self._keys
            return strided_rows(kh, start, step, p, unit), strided_rows(vh, start, step, p, unit)
        idx = self._keys[1]
        return tuple(x.index_select(1, idx).view(hkv, p, unit, d).transpose(0, 1) for x in (kh, vh))  # type: ignore[return-value]

    def __call__(self, q: Tensor, kh: Tensor, vh: Tensor) -> Tensor:
        """Decode rows q [B, Hq, D] (every rank) over one layer's cache kh, vh -> out [B, Hq, D]
        fp32, the same on every rank."""
        b, hq, d = q.shape
        table = torch.zeros(self.n_units, b, hq, d + 1, dtype=torch.float32, device=q.device)
        table[..., d] = float("-inf")
        if self.rows:
            k_u, v_u = self._unit_keys(kh, vh)
            vis = self.vis.to(q.device)
            key = (q.dtype, q.device, hq)
            lo = None if self.lo is None else self.lo.to(q.device)
            if key not in self._mask:
                self._mask[key] = unit_mask(vis, self.unit, kh.shape[0], hq // kh.shape[0], q.dtype, lo)
            o, lse = unit_partials(q[self.rows], k_u, v_u, vis, self.scale, self._mask[key], lo)
            table[self.units, self.rows, :, :d] = o
            table[self.units, self.rows, :, d] = lse
        if self.world > 1:
            parts = gather_parts(table, self.group, self.exchange)  # [W, units, B, Hq, D + 1]
            table = parts[self.owners, torch.arange(self.n_units, device=q.device)]
        return merge_in_order(table[..., :d], table[..., d])
