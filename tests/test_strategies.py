"""Every sequence-parallel strategy against the single-process reference.

Tolerances: fp32 results differ from the reference only by summation order
(blockwise online softmax vs one dense softmax): ~1e-6 relative, so 1e-5 absolute
on O(1) outputs. bf16 inputs keep 8 mantissa bits (~4e-3 relative) and outputs
are rounded to bf16 once: 2e-2 absolute.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from seqpar import ShardPlan, reference_attention, sp_attention
from seqpar.comm.collectives import STATS
from seqpar.comm.launch import run_ranks
from seqpar.sharding.plan import SCHEMES
from seqpar.strategies.registry import whole_prompt_names

BATCHES = ([1, 7, 2, 13], [3], [20, 5])  # ragged, lengths 1, shorter than the world
HEADS = ((12, 12), (12, 4), (12, 1))  # GQA ratios 1, 3 and MQA
D = 16
# fp32: blockwise attention merged by LSE reorders the sums of one softmax; on O(1) random inputs that
# moves outputs by ~1e-6, and PyTorch's CPU flash kernel adds its fast exp (up to 7.8e-5 seen in one
# full-suite run); a wrong mask or position moves them by >1e-2. bf16: 8 mantissa bits.
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def make_qkv(seq_lens: list[int], hq: int, hkv: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    t = sum(seq_lens)
    q, k, v = (torch.randn(t, h, D, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v


def _sweep(rank: int, world: int, strategy: str, dtypes: tuple) -> int:
    degrees = [d for d in range(1, world + 1) if world % d == 0] if strategy == "usp" else [None]
    checked = 0
    for lens, (hq, hkv), scheme, causal, dtype, udeg in itertools.product(
        BATCHES, HEADS, SCHEMES, (True, False), dtypes, degrees
    ):
        q, k, v = make_qkv(lens, hq, hkv, dtype, seed=len(lens) * 100 + hq + hkv)
        plan = ShardPlan(seq_lens=lens, world_size=world, scheme=scheme)
        idx = plan.local_indices(rank)
        out = sp_attention(
            q[idx], k[idx], v[idx], plan=plan, group=None, strategy=strategy, causal=causal, ulysses_degree=udeg
        )
        ref, _ = reference_attention(q.float(), k.float(), v.float(), plan.global_layout, plan.global_layout, causal)
        err = (out.float() - ref[idx]).abs().max().item() if idx.numel() else 0.0
        assert out.shape == (idx.numel(), hq, D) and out.dtype == dtype
        assert not torch.isnan(out).any()
        what = f"{strategy} {scheme} causal={causal} {lens} heads={hq}/{hkv} {dtype} udeg={udeg}"
        assert err <= TOL[dtype], f"{what}: {err}"
        checked += 1
    return checked


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", whole_prompt_names())  # every registered strategy, a new one too
def test_strategy_matches_reference(strategy: str, world: int) -> None:
    counts = run_ranks(_sweep, world, strategy, (torch.float32, torch.bfloat16))
    assert all(c == counts[0] and c > 0 for c in counts)


def _bytes(rank: int, world: int) -> dict:
    """Bytes each strategy sends, measured and by formula (fp32: 4 bytes)."""
    lens, hq, hkv = [9, 4, 1], 12, 4
    q, k, v = make_qkv(lens, hq, hkv, torch.float32, seed=1)
    plan = ShardPlan(seq_lens=lens, world_size=world, scheme="zigzag")
    idx = plan.local_indices(rank)
    t = plan.local_counts
    w, r = world, rank
    hq_r = hq // w
    kv_r = [len(__import__("seqpar.strategies.ulysses", fromlist=["x"]).kv_heads_for(hq, hkv, w, j)) for j in range(w)]
    expected = {
        # K and V of the block held at steps 0 .. W-2
        "ring": sum(2 * t[(r - s) % w] * hkv * D for s in range(w - 1)) * 4,
        # Q blocks around the ring, then every foreign partial (out + lse) home
        "pass_q": (
            sum(t[(r - s) % w] * hq * D for s in range(w - 1)) + sum(t[j] * hq * (D + 1) for j in range(w) if j != r)
        )
        * 4,
        # this rank's K/V, padded to the largest shard, to each of the W - 1 others
        "allgather": (w - 1) * max(t) * 2 * hkv * D * 4 if w > 1 else 0,
        # q/k/v head slices out, then output head slices back
        "ulysses": (
            sum(t[r] * (hq_r + 2 * kv_r[j]) * D for j in range(w) if j != r)
            + sum(t[j] * hq_r * D for j in range(w) if j != r)
        )
        * 4,
    }
    measured = {}
    for strategy in expected:
        STATS.reset()
        sp_attention(q[idx], k[idx], v[idx], plan=plan, group=None, strategy=strategy)
        measured[strategy] = STATS.total
    return {"measured": measured, "expected": expected}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bytes_sent_match_formula(world: int) -> None:
    for res in run_ranks(_bytes, world):
        assert res["measured"] == res["expected"]


def _errors(rank: int, world: int) -> list[str]:
    msgs = []
    q, k, v = make_qkv([8], 6, 2, torch.float32, seed=0)
    plan = ShardPlan(seq_lens=[8], world_size=world)
    idx = plan.local_indices(rank)
    for kwargs in ({"strategy": "ulysses"}, {"strategy": "usp", "ulysses_degree": 3}, {"strategy": "nope"}):
        with pytest.raises(ValueError) as info:
            sp_attention(q[idx], k[idx], v[idx], plan=plan, group=None, **kwargs)
        msgs.append(str(info.value))
    with pytest.raises(ValueError, match="world_size=4"):
        sp_attention(q, k, v, plan=ShardPlan([8], 2), group=None)
    return msgs


def test_clear_errors_for_impossible_configurations() -> None:
    msgs = run_ranks(_errors, 4)[0]
    assert "q heads (6)" in msgs[0] and "ulysses degree (4)" in msgs[0]
    assert "ulysses_degree" in msgs[1] and "4 ranks" in msgs[1]
    assert "unknown strategy" in msgs[2]
