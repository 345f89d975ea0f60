"""Collectives that stage tensors through host memory (ranks sharing one GPU: gloo moves only CPU
tensors, `collectives.staged`), run on CPU with staging forced on: the host copies, the ring's
landing buffer copied into the block at `wait()`, the copy back of a reduce, the shared-memory
exchange's parts copied out of its slots (`shm._copied`, a GPU's way), all give what the plain path
gives, and whole strategies stay exact. On a GPU, tests/test_gpu.py runs the real thing."""

from __future__ import annotations

import pytest
import torch

from seqpar import ShardPlan, reference_attention, sp_attention
from seqpar.comm import collectives, ring, shm
from seqpar.comm.launch import run_ranks
from seqpar.comm.shm import HostExchange


def _ops(rank: int, world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(rank + 1, 3, generator=gen)  # uneven parts
    parts = collectives.all_gather_uneven(x, [r + 1 for r in range(world)], None)
    sends = [torch.full((j + 1, rank + 2), float(rank * 10 + j)) for j in range(world)]
    got = collectives.all_to_all(sends, [(rank + 1, j + 2) for j in range(world)], None)
    summed = collectives.all_reduce(torch.arange(6.0) * (rank + 1), None)
    ex = ring.RingExchanger(None)
    block, hops = torch.full((2, 4), float(rank)), []
    for _ in range(world - 1):  # every block once around the ring
        nxt = ex.send_recv(block, (2, 4))
        ex.wait()
        hops.append(nxt.clone())
        block = nxt
    return [*parts, *got, summed, *hops]


def _exchanged(exchange: HostExchange, rank: int, world: int) -> list[torch.Tensor]:
    gathered = exchange.all_gather(torch.arange(5.0) + rank)
    shapes = [(r + 1, 3) for r in range(world)]  # uneven parts, read through views
    views = exchange.all_gather_views(torch.full(shapes[rank], rank + 0.5), shapes)
    return [gathered, *(v.clone() for v in views)]


def _staged(rank: int, world: int) -> tuple[list[bool], float]:
    """Per op, whether staged equals plain; the worst error of four strategies staged. (Plain data
    back: tensors through the result queue would be shared memory of a process about to exit.)"""
    exchange = HostExchange.create(None, 1024)
    assert exchange is not None
    plain = _ops(rank, world) + _exchanged(exchange, rank, world)
    # what a CUDA tensor in a gloo group takes (ring.py holds its own name for it)
    collectives.staged = ring.staged = lambda x, group: True
    shm._copied = lambda device: True
    staged = _ops(rank, world) + _exchanged(exchange, rank, world)
    lens = [7, 2, 13]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens), h, 8, generator=gen) for h in (6, 2, 2))
    plan = ShardPlan(seq_lens=lens, world_size=world, scheme="zigzag")
    idx = plan.local_indices(rank)
    ref, _ = reference_attention(q, k, v, plan.global_layout, plan.global_layout, True)
    err = 0.0
    for strategy in ("ring", "pass_q", "allgather", "ulysses"):
        if strategy == "ulysses" and 6 % world:
            continue
        out = sp_attention(q[idx], k[idx], v[idx], plan=plan, group=None, strategy=strategy)
        err = max(err, float((out.float() - ref[idx]).abs().max()))
    return [torch.equal(a, b) for a, b in zip(plain, staged, strict=True)], err


@pytest.mark.parametrize("world", [2, 3])
def test_staged_collectives_equal_the_plain_ones(world: int) -> None:
    for rank, (equal, err) in enumerate(run_ranks(_staged, world)):
        assert equal and all(equal), (rank, equal)
        assert err < 2e-4, (rank, err)  # fp32 LSE merges (tests/test_strategies.py's tolerance)
