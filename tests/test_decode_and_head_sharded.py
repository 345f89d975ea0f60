"""Decode merges over a sequence-sharded KV cache, and the head-sharded layout (SGLang PR #1436),
against the single-process reference (fp32: 1e-5, summation order only)."""

from __future__ import annotations

import itertools

import pytest
import torch

from seqpar import ShardPlan, TokenLayout, decode_attention, head_sharded_attention, reference_attention
from seqpar.comm.collectives import STATS
from seqpar.comm.launch import run_ranks
from seqpar.strategies.decode import MERGES

HEADS = ((12, 12), (12, 4), (12, 1))
D = 16


def _cache(lens: list[int], hq: int, hkv: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = torch.randn(len(lens), hq, D, generator=gen)
    return q, torch.randn(t, hkv, D, generator=gen), torch.randn(t, hkv, D, generator=gen)


def _decode(rank: int, world: int) -> int:
    n = 0
    for lens, (hq, hkv), scheme, merge, sharded_q in itertools.product(
        ([1, 6, 2], [3], [9, 1, 4, 2]), HEADS + ((10, 2),), ("zigzag", "striped"), MERGES, (False, True)
    ):
        q, k, v = _cache(lens, hq, hkv, seed=sum(lens) + hkv)
        plan = ShardPlan(lens, world, scheme)  # which rank caches which token (prefill shards + decode tokens)
        idx = plan.local_indices(rank)
        # the query is the newest cached token of each sequence
        q_layout = TokenLayout.build(list(range(len(lens))), [n_ - 1 for n_ in lens])
        ref, _ = reference_attention(q, k, v, q_layout, plan.global_layout)
        heads = slice(rank * hq // world, (rank + 1) * hq // world)
        q_in = q[:, heads] if sharded_q else q
        out = decode_attention(
            q_in,
            k[idx],
            v[idx],
            q_layout,
            plan.layout(rank),
            None,
            merge=merge,
            q_head_sharded=sharded_q,
            num_q_heads=hq,
        )  # 10 heads: uneven slices at W = 3, 4
        expected = ref[:, heads] if merge == "alltoall" else ref
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0, msg=f"{merge} {lens} {hq}/{hkv} {scheme}")
        n += 1
    # bytes: allgather ships W-1 copies of B Hq (D+1) fp32; alltoall 1/W of that; tree two all-reduces
    b, hq, hkv = 3, 12, 4
    q, k, v = _cache([5, 2, 7], hq, hkv, 0)
    plan = ShardPlan([5, 2, 7], world)
    q_layout = TokenLayout.build([0, 1, 2], [4, 1, 6])
    sent = {}
    for merge in ("allgather", "alltoall", "tree"):
        STATS.reset()
        idx = plan.local_indices(rank)
        decode_attention(q, k[idx], v[idx], q_layout, plan.layout(rank), None, merge=merge)
        sent[merge] = STATS.total
    w = world
    assert sent["allgather"] == (w - 1) * b * hq * (D + 1) * 4
    assert sent["alltoall"] == (w - 1) * b * (hq // w) * (D + 1) * 4
    assert sent["tree"] == 2 * (w - 1) * (b * hq * 4) // w + 2 * (w - 1) * (b * hq * (D + 1) * 4) // w
    return n


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_decode_merges_match_reference(world: int) -> None:
    assert all(n > 0 for n in run_ranks(_decode, world))


def head_sharded_heads(hq: int, hkv: int, world: int, rank: int) -> tuple[list[int], list[int]]:
    """The head-sharded layout's head assignment: every rank a share of every KV group, or whole groups."""
    group = hq // hkv
    if hkv % world == 0:
        per = hkv // world
        kv = list(range(rank * per, (rank + 1) * per))
        return [h for g in kv for h in range(g * group, (g + 1) * group)], kv
    assert group % world == 0
    share = group // world
    return [g * group + rank * share + i for g in range(hkv) for i in range(share)], list(range(hkv))


def _head_sharded(rank: int, world: int) -> int:
    n = 0
    for lens, (hq, hkv), scheme, causal, kv_mode in itertools.product(
        ([1, 7, 2, 13], [3]), HEADS, ("contiguous", "zigzag"), (True, False), ("ring", "allgather")
    ):
        gen = torch.Generator().manual_seed(n)
        t = sum(lens)
        q = torch.randn(t, hq, D, generator=gen)
        k, v = torch.randn(t, hkv, D, generator=gen), torch.randn(t, hkv, D, generator=gen)
        plan = ShardPlan(lens, world, scheme)
        ref, _ = reference_attention(q, k, v, plan.global_layout, plan.global_layout, causal)
        qh, kvh = head_sharded_heads(hq, hkv, world, rank)
        idx = plan.local_indices(rank)
        out = head_sharded_attention(q[:, qh], k[idx], v[idx], plan, None, causal, kv_mode=kv_mode, kv_head_ids=kvh)
        torch.testing.assert_close(out, ref[:, qh], atol=1e-5, rtol=0)
        n += 1
    return n


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_head_sharded_matches_reference(world: int) -> None:
    assert all(n > 0 for n in run_ranks(_head_sharded, world))


def test_gather_heads_names_a_wrong_head_count() -> None:
    from seqpar.strategies.decode import gather_heads

    with pytest.raises(ValueError, match="holds 3 heads, but its slice of 5 q heads"):
        gather_heads(torch.zeros(1, 3, 4), 5, None)
