"""Ring pass-Q: query blocks travel, K/V stay put.

Each rank computes every visiting Q block against its own K/V, giving a partial
(out, lse) for the tokens of the block's owner. One all-to-all then returns each
partial to its owner, which merges its W partials by LSE. Wins over pass-KV when
queries are fewer than keys (a short extension of a long cached prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import all_to_all, group_rank, group_size
from seqpar.comm.ring import RingExchanger
from seqpar.comm.shm import HostExchange
from seqpar.kernels.attention import attend_into_head_major, new_accumulators
from seqpar.kernels.layout import TokenLayout
from seqpar.kernels.merge import merge_many
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.over_cache import SLICE_PACK_MAX, CachedKeys, pack
from seqpar.strategies.pricing import LSE_BYTES, Cost, LayoutLayer, StepLayer
from seqpar.strategies.registry import Strategy, register


def pass_q_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: ShardPlan,
    group: dist.ProcessGroup | None,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    world, rank = group_size(group), group_rank(group)
    layouts = [plan.layout(r) for r in range(world)]
    kh, vh = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()  # [Hkv, T_local, D], read W times
    return pass_q_core(q, kh, vh, layouts, layouts[rank], group, causal, scale).to(q.dtype)


def pass_q_core(
    q: Tensor,
    kh: Tensor,
    vh: Tensor,
    q_layouts: list[TokenLayout],
    k_layout: TokenLayout,
    group: dist.ProcessGroup | None,
    causal: bool,
    scale: float | None,
    exchange: HostExchange | None = None,
    window: int | None = None,
) -> Tensor:
    """This rank's queries q [T_local, Hq, D] over the K/V of every rank; returns fp32 out.

    q_layouts[r] describes rank r's queries (they visit every rank); kh, vh [Hkv, rows, D] are
    this rank's keys, which never move: a packed shard, or a paged cache read in place through
    `k_layout`'s slot runs. `exchange`: the group's shared memory, when its ranks share a host.
    """
    world, rank = group_size(group), group_rank(group)
    counts = [len(lay) for lay in q_layouts]
    hq, d = q.shape[1], q.shape[2]
    if exchange is not None and world > 1:
        # every rank's partials for every rank in one message: the larger of the two exchanges
        if exchange.fits_parts([(sum(counts), hq, d + 1)], torch.float32, q.device):
            return _through_shared_memory(q, kh, vh, q_layouts, k_layout, exchange, causal, scale, window)
    partials: list[Tensor] = [q.new_empty(0)] * world  # partials[j]: [T_j, Hq, D + 1] fp32 for rank j
    ring = RingExchanger(group) if world > 1 else None
    q_block = q
    for step in range(world):
        owner = (rank - step) % world
        recv = None
        if ring is not None and step + 1 < world:
            recv = ring.send_recv(q_block, (counts[(rank - step - 1) % world], hq, d))
        out, lse = new_accumulators(q_block)
        attend_into_head_major(out, lse, q_block, kh, vh, q_layouts[owner], k_layout, causal, scale, True, window)
        partials[owner] = torch.cat([out, lse.unsqueeze(-1)], dim=-1)  # out and lse in one message
        if recv is not None:
            ring.wait()
            q_block = recv
    mine = all_to_all(partials, [(counts[rank], hq, d + 1)] * world, group)
    stacked = torch.stack(mine)  # [W, T_local, Hq, D + 1]
    out, _ = merge_many(stacked[..., :d], stacked[..., d])
    return out


def _through_shared_memory(
    q: Tensor,
    kh: Tensor,
    vh: Tensor,
    q_layouts: list[TokenLayout],
    k_layout: TokenLayout,
    exchange: HostExchange,
    causal: bool,
    scale: float | None,
    window: int | None = None,
) -> Tensor:
    """pass_q_core on one host: every rank publishes its queries once and reads the others' in
    place; then publishes its partials for every rank at once and reads its own rows of the
    others'. The same blocks and the same merge order as the ring: the same sums."""
    world, rank = exchange.world, exchange.rank
    counts = [len(lay) for lay in q_layouts]
    hq, d = q.shape[1], q.shape[2]
    blocks = exchange.all_gather_views(q.contiguous(), [(c, hq, d) for c in counts])
    partials = q.new_empty(sum(counts), hq, d + 1, dtype=torch.float32)  # rows in rank order
    starts = [sum(counts[:j]) for j in range(world)]
    for step in range(world):  # the ring's order
        owner = (rank - step) % world
        block = q if owner == rank else blocks[owner]
        out, lse = new_accumulators(block)
        attend_into_head_major(out, lse, block, kh, vh, q_layouts[owner], k_layout, causal, scale, True, window)
        rows = partials[starts[owner] : starts[owner] + counts[owner]]
        rows[..., :d].copy_(out)
        rows[..., d].copy_(lse)
    # peers read only their rows: the meter counts what the ring would send back
    others = (sum(counts) - counts[rank]) * hq * (d + 1) * partials.element_size()
    views = exchange.all_gather_views(partials, [tuple(partials.shape)] * world, counted=others)
    mine = slice(starts[rank], starts[rank] + counts[rank])
    stacked = torch.stack([views[j][mine] for j in range(world)])  # [W, T_local, Hq, D + 1]
    out, _ = merge_many(stacked[..., :d], stacked[..., d])
    return out


def pass_q_over_cache(
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
    """Pass-Q over the cache: queries travel, cached K/V are read in place in the paged storage."""
    rank = group_rank(group)
    if len(keys.slot_ranges) > SLICE_PACK_MAX and not keys.local_in_place:
        # Blocks scattered over storage (a cache that served other requests): one kernel call
        # per short stretch would cost more than packing them once for all W query blocks.
        kv = pack(kh, vh, keys)
        return pass_q_core(q, kv[0], kv[1], q_layouts, keys.packed[rank], group, True, scale, exchange, window)
    return pass_q_core(q, kh, vh, q_layouts, keys.in_storage[rank], group, True, scale, exchange, window)


# ---- cost ------------------------------------------------------------------------------------
def pass_q_bytes(counts: Sequence[int], rank: int, hq: int, d: int, b: int) -> int:
    """Pass-Q: Q blocks travel the ring like K/V in pass-KV, then each foreign partial (out and
    lse, fp32) goes home in one all-to-all."""
    w = len(counts)
    ring = sum(counts[(rank - s) % w] * hq * d * b for s in range(w - 1))
    return ring + sum(counts[j] * hq * (d + 1) * LSE_BYTES for j in range(w) if j != rank)


def _layout_s(x: LayoutLayer) -> float:
    back = (x.cp - 1) * x.tokens_local * x.hq * (x.d + 1) * LSE_BYTES  # partials home: the all-to-all part
    return x.overlapped_ring_s(x.tokens_local * x.hq * x.d * x.b) + back / x.bandwidth + x.latency


def _step_s(x: StepLayer) -> float:
    """W lockstep steps of visiting queries over local keys (read in place unless too scattered),
    then the partials go home and each rank merges its W."""
    w, hq, d, b, copy_s, partial, qc = x.world, x.hq, x.d, x.b, x.copy_s, x.partial, x.query_counts
    pq = max(copy_s(2 * x.hkv * d * b * x.key_counts[r]) for r in range(w)) if x.packs_keys else 0.0
    if w > 1 and partial * sum(qc) <= x.kv_exchange_bytes:
        # through shared memory: queries published once, each rank at its own pace, then every
        # rank's partials for every rank published at once
        shm = x.links["shm"]
        pq += shm.seconds(hq * d * b * max(qc))
        pq += max(sum(x.comp_in_place[j][r] + copy_s(partial * qc[j]) for j in range(w)) for r in range(w))
        pq += shm.seconds(partial * sum(qc)) + max(copy_s(2 * w * partial * qc[r]) for r in range(w))
    else:
        for s in range(w):
            compute = max(x.comp_in_place[(r - s) % w][r] + copy_s(partial * qc[(r - s) % w]) for r in range(w))
            move = max(x.links["p2p"].seconds(hq * d * b * qc[(r - s) % w]) for r in range(w)) if s < w - 1 else 0.0
            pq += x.overlapped(compute, move)
        if w > 1:
            back = max(sum(qc[j] for j in range(w) if j != r) * partial for r in range(w))
            pq += x.links["all_to_all"].seconds(back) + max(copy_s(2 * w * partial * qc[r]) for r in range(w))
    return pq


register(
    Strategy(
        "pass_q",
        "pass-Q: queries travel a ring, partial outputs return by all-to-all, merged by LSE",
        whole=pass_q_attention,
        over_cache=pass_q_over_cache,
        cost=Cost(
            lambda counts, rank, hq, hkv, d, b: pass_q_bytes(counts, rank, hq, d, b),
            layout_s=_layout_s,
            step_s=_step_s,
            counts="queries",
            tie_rank=1,
        ),
    )
)
