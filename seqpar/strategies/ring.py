"""Ring pass-KV: K/V blocks travel around the ring while every rank keeps its queries.

At step s a rank holds the K/V block of rank (rank - s) mod W. The transfer of the
next block is posted before the current block is computed and waited on after,
so with compute time >= transfer time the communication is hidden. Each block is
merged into fp32 (out, lse) accumulators. With zigzag shards every step does the
same causal work on every rank; with contiguous shards fully masked blocks are
skipped but the last rank still does the most work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import group_rank, group_size
from seqpar.comm.ring import RingExchanger
from seqpar.comm.shm import HostExchange
from seqpar.kernels.attention import attend_into_head_major, new_accumulators
from seqpar.kernels.layout import TokenLayout
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.over_cache import CachedKeys, kv_message_shapes, pack
from seqpar.strategies.pricing import Cost, LayoutLayer, StepLayer
from seqpar.strategies.registry import Strategy, register


def ring_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_layout: TokenLayout,
    kv_layouts: list[TokenLayout],
    group: dist.ProcessGroup | None,
    causal: bool,
    scale: float | None,
    kv_heads: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """q [Tq, Hq, D] against the K/V of every ring member; kv_layouts[r] describes member r's block.

    kv_heads: the heads of each travelling block that q's heads read (all when None).

    Returns fp32 out [Tq, Hq, D] and lse [Tq, Hq].
    """
    # [2, Hkv, T_r, D]: K and V in one message, head-major as the kernels read them, so no
    # rank re-lays-out a received block.
    kv = torch.stack([k, v]).transpose(1, 2).contiguous()
    return ring_core_packed(q, kv, q_layout, kv_layouts, group, causal, scale, kv_heads)


def ring_core_packed(
    q: Tensor,
    kv: Tensor,
    q_layout: TokenLayout,
    kv_layouts: list[TokenLayout],
    group: dist.ProcessGroup | None,
    causal: bool,
    scale: float | None,
    kv_heads: list[int] | None = None,
    window: int | None = None,
    own: tuple[Tensor, Tensor, TokenLayout] | None = None,
) -> tuple[Tensor, Tensor]:
    """`ring_core` with this rank's K/V already packed as one message kv [2, Hkv, T_local, D].
    `own`: (kh, vh, layout) this rank attends instead of its message (its keys read in place)."""
    world, rank = group_size(group), group_rank(group)
    acc_out, acc_lse = new_accumulators(q)
    hkv, d = kv.shape[1], kv.shape[3]
    ring = RingExchanger(group) if world > 1 else None
    for step in range(world):
        src = (rank - step) % world
        recv = None
        if ring is not None and step + 1 < world:
            nxt = (rank - step - 1) % world
            recv = ring.send_recv(kv, (2, hkv, len(kv_layouts[nxt]), d))
        k_blk, v_blk = (kv[0], kv[1]) if kv_heads is None else (kv[0][kv_heads], kv[1][kv_heads])
        layout = kv_layouts[src]
        if step == 0 and own is not None:
            k_blk, v_blk, layout = own
        attend_into_head_major(acc_out, acc_lse, q, k_blk, v_blk, q_layout, layout, causal, scale, step == 0, window)
        if recv is not None:
            ring.wait()
            kv = recv
    return acc_out, acc_lse


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: ShardPlan,
    group: dist.ProcessGroup | None,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    rank = group_rank(group)
    layouts = [plan.layout(r) for r in range(plan.world_size)]
    out, _ = ring_core(q, k, v, layouts[rank], layouts, group, causal, scale)
    return out.to(q.dtype)


def ring_over_cache(
    q: Tensor,
    q_layouts: list[TokenLayout],
    kh: Tensor,
    vh: Tensor,
    keys: CachedKeys,
    group: dist.ProcessGroup | None,
    scale: float | None,
    exchange: HostExchange | None = None,
    window: int | None = None,
) -> Tensor:
    """Pass-KV over the cache: each rank packs its cached K/V of the step once and the messages
    travel the ring; ranks on one host publish them once in shared memory and read in place, in
    the ring's order (the same sums)."""
    rank = group_rank(group)
    kv = pack(kh, vh, keys)
    shapes = kv_message_shapes(keys, kh.shape[0], kh.shape[2])
    own = (kh, vh, keys.in_storage[rank]) if keys.local_in_place else (kv[0], kv[1], keys.packed[rank])
    if exchange is None or not exchange.fits_parts(shapes, kv.dtype, kv.device):
        out, _ = ring_core_packed(q, kv, q_layouts[rank], keys.packed, group, True, scale, window=window, own=own)
        return out
    parts = exchange.all_gather_views(kv, shapes)
    out, lse = new_accumulators(q)
    for step in range(len(parts)):  # the ring's order: the same sums as over the process group
        src = (rank - step) % len(parts)
        k_blk, v_blk, layout = own if src == rank else (parts[src][0], parts[src][1], keys.packed[src])
        attend_into_head_major(out, lse, q, k_blk, v_blk, q_layouts[rank], layout, True, scale, step == 0, window)
    return out


# ---- cost ------------------------------------------------------------------------------------
def ring_bytes(counts: Sequence[int], rank: int, hkv: int, d: int, b: int) -> int:
    """Pass-KV: at steps 0 .. W-2 a rank forwards the K and V block it holds (its own first)."""
    w = len(counts)
    return sum(2 * counts[(rank - s) % w] * hkv * d * b for s in range(w - 1))


def _layout_s(x: LayoutLayer) -> float:
    return x.overlapped_ring_s(2 * x.tokens_local * x.hkv * x.d * x.b)


def _step_s(x: StepLayer) -> float:
    """Pack this rank's keys into one message, then W lockstep steps: a step costs the slowest
    rank's compute and the slowest transfer, as far as they overlap."""
    w, copy_s, partial, qc = x.world, x.copy_s, x.partial, x.query_counts
    message = [2 * x.hkv * x.d * x.b * x.key_counts[r] for r in range(w)]
    ring = max(copy_s(m) for m in message)
    if w > 1 and 0 < max(message) <= x.kv_exchange_bytes:
        # through shared memory: every rank publishes its message once, then attends over all W
        # in place, each rank at its own pace (no lockstep, nothing in flight)
        ring += x.links["shm"].seconds(max(message))
        ring += max(sum(x.comp[r]) + w * copy_s(partial * qc[r]) for r in range(w))
    else:
        for s in range(w):
            compute = max(x.comp[r][(r - s) % w] for r in range(w))
            move = max(x.links["p2p"].seconds(message[(r - s) % w]) for r in range(w)) if s < w - 1 else 0.0
            ring += x.overlapped(compute, move) + max(copy_s(partial * qc[r]) for r in range(w))
    return ring


register(
    Strategy(
        "ring",
        "pass-KV: K/V blocks travel a ring, overlapped with compute",
        whole=ring_attention,
        over_cache=ring_over_cache,
        cost=Cost(
            lambda counts, rank, hq, hkv, d, b: ring_bytes(counts, rank, hkv, d, b),
            layout_s=_layout_s,
            step_s=_step_s,
            tie_rank=0,  # ties go to pass-KV, the engine's strategy when no prefill runs
        ),
    )
)
