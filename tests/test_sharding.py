from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpar import ShardPlan
from seqpar.sharding.plan import SCHEMES

lens_st = st.lists(st.integers(1, 40), min_size=1, max_size=5)
scheme_st = st.sampled_from(SCHEMES)


@settings(max_examples=200, deadline=None)
@given(lens_st, st.integers(1, 6), scheme_st)
def test_shard_then_unshard_is_identity(lens, world, scheme) -> None:
    plan = ShardPlan(seq_lens=lens, world_size=world, scheme=scheme)
    x = torch.arange(sum(lens) * 2).view(-1, 2)
    parts = [plan.shard(x, r) for r in range(world)]
    assert torch.equal(plan.unshard(parts), x)
    # every token on exactly one rank, positions within each sequence
    every = torch.cat([plan.local_indices(r) for r in range(world)])
    assert sorted(every.tolist()) == list(range(sum(lens)))
    for r in range(world):
        seq, pos = plan.seq_ids(r), plan.positions(r)
        assert torch.equal(plan.local_indices(r), torch.tensor(plan.offsets)[seq] + pos)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 16), min_size=1, max_size=4), st.integers(1, 6))
def test_zigzag_balances_causal_work(units, world) -> None:
    """With 2W | L zigzag gives every rank exactly equal causal work; contiguous never does better."""
    lens = [u * 2 * world for u in units]
    zig = [ShardPlan(lens, world, "zigzag").causal_work(r) for r in range(world)]
    assert len(set(zig)) == 1
    contig = [ShardPlan(lens, world, "contiguous").causal_work(r) for r in range(world)]
    assert max(zig) <= max(contig)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=4), st.integers(2, 6))
def test_zigzag_work_nearly_balanced_for_any_length(lens, world) -> None:
    work = [ShardPlan(lens, world, "zigzag").causal_work(r) for r in range(world)]
    # chunk sizes differ by at most one token, so the imbalance is at most ~2 tokens' rows per sequence
    assert max(work) - min(work) <= sum(2 * n + 2 for n in lens)


def test_sequences_shorter_than_world() -> None:
    plan = ShardPlan([2, 1], world_size=4, scheme="zigzag")
    assert plan.local_counts == (2, 1, 0, 0) or sum(plan.local_counts) == 3
    assert [plan.num_local_tokens(r) for r in range(4)].count(0) >= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_lens": [], "world_size": 2}, "non-empty"),
        ({"seq_lens": [3, 0], "world_size": 2}, "positive"),
        ({"seq_lens": [3], "world_size": 0}, "world_size"),
        ({"seq_lens": [3], "world_size": 2, "scheme": "diagonal"}, "contiguous, zigzag, striped"),
    ],
)
def test_bad_plans_are_clear_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ShardPlan(**kwargs)
