"""The shared-memory all-gather that decode merges use on one host: exact copies of every
rank's part, in order, over many calls with ranks at different speeds; decode merges
through it equal the single-process reference; a dead peer raises instead of hanging."""

from __future__ import annotations

import glob
import itertools
import time

import pytest
import torch

from seqpar import ShardPlan, TokenLayout, decode_attention, reference_attention
from seqpar.comm.collectives import STATS
from seqpar.comm.launch import run_ranks
from seqpar.comm.shm import HostExchange
from seqpar.strategies.decode import MERGES, gather_parts

pytestmark = pytest.mark.skipif(not HostExchange.supported(), reason="HostExchange needs x86-64 (total store order)")


def _gathers(rank: int, world: int) -> int:
    leftovers = set(glob.glob("/dev/shm/seqpar-exchange-*"))
    ex = HostExchange.create(None, capacity=4096, timeout_s=60)
    if world == 1:
        assert ex is None  # nothing to exchange: callers use the (trivial) group
        return 0
    assert ex is not None
    assert set(glob.glob("/dev/shm/seqpar-exchange-*")) <= leftovers, "the setup files must be unlinked"
    calls = 0
    for step, dtype in itertools.product(range(60), (torch.float32, torch.int64, torch.bfloat16)):
        if (step + rank) % 7 == 0:
            time.sleep(0.002 * rank)  # ranks drift apart: one runs a call ahead of another
        shape = (1 + step % 3, 5)
        mine = torch.full(shape, 100 * step + rank).to(dtype)
        got = ex.all_gather(mine)
        want = torch.stack([torch.full(shape, 100 * step + r).to(dtype) for r in range(world)])
        assert got.dtype == dtype and torch.equal(got, want), (step, dtype)
        calls += 1
    big = torch.zeros(4097, dtype=torch.uint8)
    assert not ex.fits(big)
    with pytest.raises(ValueError, match="does not fit"):
        ex.all_gather(big)
    # gather_parts falls back to the process group for what does not fit, the same on every rank
    parts = gather_parts(torch.full((2, 3000), float(rank)), None, ex)
    assert torch.equal(parts, torch.stack([torch.full((2, 3000), float(r)) for r in range(world)]))
    return calls


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_host_exchange_gathers_every_part_in_order(world: int) -> None:
    results = run_ranks(_gathers, world, timeout=240)
    assert results == [0 if world == 1 else 180] * world


def _merges(rank: int, world: int) -> int:
    ex = HostExchange.create(None, capacity=1 << 16, timeout_s=60)
    n = 0
    for lens, (hq, hkv), merge in itertools.product(
        ([1, 6, 2], [3], [9, 1, 4, 2]), ((12, 4), (12, 1), (10, 2)), MERGES
    ):
        gen = torch.Generator().manual_seed(sum(lens) + hkv)
        q = torch.randn(len(lens), hq, 16, generator=gen)
        k, v = torch.randn(sum(lens), hkv, 16, generator=gen), torch.randn(sum(lens), hkv, 16, generator=gen)
        plan = ShardPlan(lens, world, "zigzag")
        idx = plan.local_indices(rank)
        q_layout = TokenLayout.build(list(range(len(lens))), [n_ - 1 for n_ in lens])
        ref, _ = reference_attention(q, k, v, q_layout, plan.global_layout)
        STATS.reset()
        out = decode_attention(q, k[idx], v[idx], q_layout, plan.layout(rank), None, merge=merge, exchange=ex)
        heads = slice(rank * hq // world, (rank + 1) * hq // world)
        torch.testing.assert_close(
            out, ref[:, heads] if merge == "alltoall" else ref, atol=1e-5, rtol=0, msg=f"{merge} {lens} {hq}/{hkv}"
        )
        # one write of the packed partial (B Hq (D + 1) fp32), whatever the merge
        assert STATS.total == (0 if world == 1 else len(lens) * hq * 17 * 4)
        n += 1
    return n


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_decode_merges_through_shared_memory_match_reference(world: int) -> None:
    assert all(n == 27 for n in run_ranks(_merges, world, timeout=240))


def _no_room(rank: int, world: int) -> bool:
    import os

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    os.posix_fallocate = full  # a full /dev/shm, in this spawned process only
    return HostExchange.create(None, capacity=1 << 20) is None


def test_host_exchange_declines_when_shared_memory_is_full() -> None:
    assert run_ranks(_no_room, 2, timeout=60) == [True, True]


def _one_rank_unsupported(rank: int, world: int) -> bool:
    if rank == world - 1:  # say, a rank on another kind of CPU
        HostExchange.supported = staticmethod(lambda: False)
    return HostExchange.create(None, capacity=64) is None


def test_host_exchange_is_declined_by_all_when_one_rank_cannot_use_it() -> None:
    assert run_ranks(_one_rank_unsupported, 3, timeout=60) == [True, True, True]


def _dead_peer(rank: int, world: int) -> str:
    ex = HostExchange.create(None, capacity=64, timeout_s=1.0)
    ex.all_gather(torch.ones(4))
    if rank == 1:
        return "left"  # never makes the second call
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\].*died or is stuck"):
        ex.all_gather(torch.ones(4))
    assert time.monotonic() - start < 10
    return "raised"


def test_host_exchange_raises_when_a_peer_stops() -> None:
    assert run_ranks(_dead_peer, 2, timeout=60) == ["raised", "left"]


def _ring_over_cache(rank: int, world: int) -> int:
    """Pass-KV and pass-Q over a cached prefix through shared memory: the very sums of the process
    group's ring (same blocks, same order), for ragged shares; parts of uneven sizes read in place."""
    from seqpar.engine.messages import SeqStep, Step
    from seqpar.engine.placement import Placement
    from seqpar.engine.step_plan import StepPlan
    from seqpar.strategies.over_cache import attention_over_cache, kv_message_shapes

    ex = HostExchange.create(None, capacity=1 << 16, timeout_s=60)
    bs, hq, hkv, d = 4, 6, 2, 8
    placement = Placement(world, bs, 1, "snake")
    n = 0
    for cached, new in ((0, 3), (5, 2), (13, 11), (40, 1)):  # fewer new tokens than ranks, too
        end = cached + new
        used, blocks = [0] * world, []
        for i in range(-(-end // bs)):
            blocks.append(used[placement.owner(i)])
            used[placement.owner(i)] += 1
        plan = StepPlan(
            Step([SeqStep(0, list(range(cached, end)), cached, [blocks], False, False, end)], "ring"), placement, rank
        )
        gen = torch.Generator().manual_seed(end)
        kh, vh = torch.randn(hkv, max(used) * bs, d, generator=gen), torch.randn(hkv, max(used) * bs, d, generator=gen)
        q = torch.randn(len(plan.q_layouts[rank]), hq, d, generator=gen)
        assert ex.fits_parts(kv_message_shapes(plan.keys, hkv, d), torch.float32, q.device)
        STATS.reset()
        shm = attention_over_cache(q, plan.q_layouts, kh, vh, plan.keys, None, "ring", None, ex)
        assert STATS.total == 2 * hkv * d * 4 * len(plan.keys.packed[rank])  # written once, read in place
        gloo = attention_over_cache(q, plan.q_layouts, kh, vh, plan.keys, None, "ring", None)
        assert torch.equal(shm, gloo), (cached, new)
        # pass-Q: queries published once, then every rank's partials for every rank
        STATS.reset()
        shm = attention_over_cache(q, plan.q_layouts, kh, vh, plan.keys, None, "pass_q", None, ex)
        rows = sum(len(lay) for lay in plan.q_layouts)
        mine = len(plan.q_layouts[rank])
        assert STATS.total == 4 * (mine * hq * d + (rows - mine) * hq * (d + 1))
        gloo = attention_over_cache(q, plan.q_layouts, kh, vh, plan.keys, None, "pass_q", None)
        assert torch.equal(shm, gloo), ("pass_q", cached, new)
        n += 1
    shapes = [(3 + r, 2) for r in range(world)]  # uneven parts
    views = ex.all_gather_views(torch.full(shapes[rank], float(rank)), shapes)
    assert all(torch.equal(v, torch.full(shapes[r], float(r))) for r, v in enumerate(views))
    assert not ex.fits_parts([(1 << 15,)] * world, torch.float32, torch.device("cpu"))
    return n


@pytest.mark.parametrize("world", [2, 3, 4])
def test_pass_kv_and_pass_q_through_shared_memory_equal_the_ring(world: int) -> None:
    assert run_ranks(_ring_over_cache, world, timeout=240) == [4] * world
