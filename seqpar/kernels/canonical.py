"""Attention in one canonical order, the same bits however the work is split.

A query at position p attends keys [0, p]. Cut positions into KV units of U tokens
(unit u holds [uU, (u+1)U)). The canonical result of a query is:
1. for each unit u <= p // U, a partial (o_u, lse_u) from a CPU flash-kernel call over the
   unit's U keys (keys the query may not see masked with -inf, a last unit padded with any
   finite keys, masked too), the query among rows padded so that the kernel's last query block
   holds 0 or >= `MIN_TAIL` rows (`padded_rows`); a decode step's units go as the batch of one call;
2. those partials merged left to right, u = 0, 1, ..., in fp32 (`OrderedMerge`).
Every rank of any SP degree, a chunk of any size, a decode step or a prefill computes a row this
way, so its bits do not depend on which rows share its call, how the keys were spread over
ranks, or where they were read from.

Why each call gives a row the same bits (measured, torch 2.13 CPU, fp32 and bf16, 1 and 2
threads, 1-3 KV heads, batch 1-5): the kernel splits queries into blocks of 32, 64 or 256 rows
(by row count: < 192, < 768, more) and keys into blocks of 512, and runs the (batch, head, query
block) items in parallel; a row's arithmetic is two one-thread GEMMs over its query block and
per-row softmax code. With keys a fixed U <= 512 and a last query block of 0 or >= `MIN_TAIL`
rows, a row's result is the same at any row count (8 to 4,096), offset, neighbours or batch
element; a mask of zeros, an expanded one and none agree. A short last block does not (MKL's
small-GEMM paths): 1-3 rows on AMD EPYC Zen 4 and Zen 5; on an Intel Xeon with AMX (fp32, 1 and 2
threads, D 8-128, U 4-512, 1 and 3 KV heads) 1-2 rows at D 64, 1-5 at D 128 and 1-7 at D = U = 8,
never 8 or more. Nor, in a call of one item (run outside a parallel region, its GEMMs threaded),
one of 5-7 or 9-11 rows on 2 threads: such calls get full blocks.

Merging (o_a, lse_a) then (o_b, lse_b) with running max m, weight sum s and unnormalised acc:
    m' = max(m, lse_b); a = exp(m - m'); b = exp(lse_b - m')
    acc' = acc * a + o_b * b;  s' = s * a + b;  out = acc / s
(acc / s = sum_u exp(lse_u - m) o_u / sum_u exp(lse_u - m), the LSE merge of merge.py). Only
max, exp, mul, add and div: ops whose vector and scalar code agree, so a row's result does not
depend on where it sits in the tensor. A unit with lse = -inf (absent) leaves the state as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.profiling import KERNEL, MERGE, traced

# Rows the flash kernel's last query block holds at least (or none): fewer take a small-GEMM path
# whose bits differ, up to 7 rows on the CPUs measured (the module note).
MIN_TAIL = 8


def padded_rows(n: int, items: int) -> int:
    """Rows to give the CPU flash kernel, n query rows per (batch, KV head) and `items` such
    pairs, so that its last query block holds 0 or >= `MIN_TAIL` rows (a GEMM of fewer takes
    another path on some CPUs); full blocks when items is 1 (the kernel then runs outside a parallel region, where
    the GEMM may split a block's rows over threads)."""
    n = max(n, 1)
    while True:
        block = 32 if n < 192 else 64 if n < 768 else 256
        tail = n % block
        if tail == 0 or (items > 1 and tail >= MIN_TAIL):
            return n
        n += block - tail if items == 1 else MIN_TAIL - tail


def _hidden(cols: Tensor, vis: Tensor, lo: Tensor | None) -> Tensor:
    """[n, U] True where a row does not see a key: past its keys [lo, vis) of the unit."""
    out = cols.unsqueeze(0) >= vis.unsqueeze(1)
    return out if lo is None else out | (cols.unsqueeze(0) < lo.unsqueeze(1))


@traced(KERNEL)
def _call(
    q: Tensor, kh: Tensor, vh: Tensor, vis: Tensor | None, scale: float, lo: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """q [n, Hq, D] over one unit kh, vh [Hkv, U, D]; row i sees keys [lo[i], vis[i]) of it (vis None:
    all U; lo None: from 0, a sliding window's rows from where it starts).
    -> o [n, Hq, D] fp32, lse [n, Hq] fp32."""
    n, hq, d = q.shape
    hkv, u = kh.shape[0], kh.shape[1]
    g = hq // hkv
    rows = padded_rows(g * n, hkv)
    # GQA: a KV head's g query heads are g * n rows against the same keys (rows head-major).
    qp = q.new_zeros(1, hkv, rows, d)
    qp[0, :, : g * n] = q.transpose(0, 1).reshape(hkv, g * n, d)
    mask = None
    if vis is not None:
        cols = torch.arange(u, device=q.device)
        rowmask = torch.zeros(n, u, dtype=q.dtype, device=q.device)
        rowmask.masked_fill_(_hidden(cols, vis, lo), float("-inf"))  # [n, U]
        mask = q.new_zeros(1, 1, rows, u)
        mask[0, 0, : g * n] = rowmask.repeat(g, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qp, kh.unsqueeze(0), vh.unsqueeze(0), 0.0, attn_mask=mask, scale=scale
    )
    o = out[0, :, : g * n].reshape(hq, n, d).transpose(0, 1).float()  # [n, Hq, D]
    return o, lse[0, :, : g * n].reshape(hq, n).transpose(0, 1).float()


def unit_mask(vis: Tensor, unit: int, hkv: int, g: int, dtype: torch.dtype, lo: Tensor | None = None) -> Tensor | None:
    """The additive mask `unit_partials` gives the kernel for rows seeing keys [lo[i], vis[i]) of
    their unit (lo None: from 0): [P, 1, rows, unit], or None when every row sees the whole unit."""
    if not bool((vis < unit).any()) and (lo is None or not bool((lo > 0).any())):
        return None
    mask = torch.zeros(vis.shape[0], 1, padded_rows(g, vis.shape[0] * hkv), unit, dtype=dtype, device=vis.device)
    cols = torch.arange(unit, device=vis.device)
    return mask.masked_fill_(_hidden(cols, vis, lo)[:, None, None], float("-inf"))


@traced(KERNEL)
def unit_partials(
    q: Tensor, kh: Tensor, vh: Tensor, vis: Tensor, scale: float, mask: Tensor | None = None, lo: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One query row per unit, all in one flash call (a decode step's units, the units as the
    batch): row i of q [P, Hq, D] over unit i of kh, vh [P, Hkv, U, D], seeing its keys
    [lo[i], vis[i]) (lo None: from 0; `mask`: `unit_mask` of them, when the caller keeps it across
    layers).
    -> o [P, Hq, D] fp32, lse [P, Hq] fp32, each row the bits `_call` gives it."""
    p, hq, d = q.shape
    hkv, u = kh.shape[1], kh.shape[2]
    g = hq // hkv
    rows = padded_rows(g, p * hkv)
    qp = q.new_zeros(p, hkv, rows, d)
    qp[:, :, :g] = q.view(p, hkv, g, d)  # query head h = KV head h // g, row h % g
    if mask is None:
        mask = unit_mask(vis, u, hkv, g, q.dtype, lo)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qp, kh, vh, 0.0, attn_mask=mask, scale=scale)
    return out[:, :, :g].reshape(p, hq, d).float(), lse[:, :, :g].reshape(p, hq).float()


class OrderedMerge:
    """Running canonical merge for rows [0, n): partials added unit by unit, left to right."""

    def __init__(self, n: int, hq: int, d: int, device: torch.device) -> None:
        self.acc = torch.zeros(n, hq, d, dtype=torch.float32, device=device)
        self.m = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=device)
        self.s = torch.zeros(n, hq, dtype=torch.float32, device=device)

    @traced(MERGE)
    def add(self, row: int, o: Tensor, lse: Tensor) -> None:
        """Merge the next unit's partial o [k, Hq, D], lse [k, Hq] into rows [row, row + k)."""
        rows = slice(row, row + o.shape[0])
        m = self.m[rows]
        top = torch.maximum(m, lse)
        wa = (m - top).exp_()  # a row's first unit: exp(-inf) = 0, so acc starts at o exactly
        wa = wa.masked_fill_(torch.isneginf(top), 0.0)  # nothing yet, nor now: -inf - -inf is nan
        wb = (lse - top).exp_()
        wb = wb.masked_fill_(torch.isneginf(lse), 0.0)  # an absent unit (lse -inf) adds nothing
        acc = self.acc[rows]
        acc.mul_(wa.unsqueeze(-1)).add_(o * wb.unsqueeze(-1))
        self.s[rows].mul_(wa).add_(wb)
        m.copy_(top)

    def result(self) -> Tensor:
        """out [n, Hq, D] fp32; a row no unit reached is 0."""
        s = self.s.masked_fill(self.s == 0, 1.0)
        return self.acc / s.unsqueeze(-1)


def merge_in_order(o: Tensor, lse: Tensor) -> Tensor:
    """`OrderedMerge` over all the units at once: o [units, B, Hq, D], lse [units, B, Hq] (fp32)
    -> out [B, Hq, D] fp32, the same bits as adding the units one by one (the running max is a
    cumulative max, the weights the same elementwise ops on the same operands; only the
    accumulation runs unit by unit)."""
    top = torch.cummax(lse, 0).values  # m after unit u
    prev = torch.cat([torch.full_like(top[:1], float("-inf")), top[:-1]])  # m before it
    wa = (prev - top).exp_()
    wa = wa.masked_fill_(torch.isneginf(top), 0.0)  # no unit yet (a window's row skips the first)
    wb = (lse - top).exp_()
    wb = wb.masked_fill_(torch.isneginf(lse), 0.0)
    ow = o * wb.unsqueeze(-1)
    acc = torch.zeros_like(o[0])
    s = torch.zeros_like(lse[0])
    for u in range(o.shape[0]):
        acc.mul_(wa[u].unsqueeze(-1)).add_(ow[u])
        s.mul_(wa[u]).add_(wb[u])
    s = s.masked_fill(s == 0, 1.0)
    return acc / s.unsqueeze(-1)


def attend_unit(
    merge: OrderedMerge,
    row: int,
    q: Tensor,
    vis: Tensor,
    kh: Tensor,
    vh: Tensor,
    scale: float,
    lo: Tensor | None = None,
) -> None:
    """Merge the partials of q [k, Hq, D] (rows [row, row + k) of `merge`) over one unit kh, vh
    [Hkv, U, D]; vis [k] (non-decreasing, >= 1): keys [0, vis) of the unit each row sees, from
    lo [k] on (a sliding window's rows; None: 0) where given, masked in one call."""
    if lo is not None and bool((lo > 0).any()):
        o, lse = _call(q, kh, vh, vis, scale, lo)
        merge.add(row, o, lse)
        return
    u = kh.shape[1]
    full = int((vis < u).sum())  # rows before this see part of the unit: a masked call
    if full:
        o, lse = _call(q[:full], kh, vh, vis[:full], scale)
        merge.add(row, o, lse)
    if full < q.shape[0]:
        o, lse = _call(q[full:], kh, vh, None, scale)
        merge.add(row + full, o, lse)
