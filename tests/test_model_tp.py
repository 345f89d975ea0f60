"""Tensor-parallel rewriting (parallelize_tp, parallelize_head_sharded) and head_shard.

The sharded runs use 2 real processes (spawn, gloo on loopback) and compare their logits
with the unsharded model in the same process. Tolerance: a row-parallel all-reduce sums
two fp32 partial products instead of one full one, moving logits of size ~1-10 by
~1e-6; atol 1e-4 still catches a wrong head permutation or a doubled bias (errors ~1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from seqpar.comm.launch import run_ranks
from seqpar.model import head_shard, load_model, parallelize_head_sharded, parallelize_tp
from test_model_helpers import our_logits, packed_batch, save_tiny

WORLD = 2
TIMEOUT_S = 120  # generous for a loaded 2-core machine; a hang fails instead of blocking CI

# name -> (kind, overrides, layout, expected q heads of rank 0, expected kv heads of rank 0)
CASES = {
    # Plain TP: 4 q / 2 kv -> rank 0 has q 0,1 and kv 0.
    "llama_gqa_tp": ("llama", {}, "tp", [0, 1], [0]),
    # q/k/v biases sliced with their heads, tied embeddings, uneven MLP split (81 = 40 + 41).
    "qwen2_bias_tp": ("qwen2", {"tie_word_embeddings": True, "intermediate_size": 81}, "tp", [0, 1], [0]),
    # Head-sharded layout: 3 kv heads cannot split over 2 ranks, so every rank keeps all kv heads and
    # one q head of each KV group (group size 2); o_proj's bias must be added exactly once.
    "llama_head_sharded_layout": (
        "llama",
        {"num_attention_heads": 6, "num_key_value_heads": 3, "attention_bias": True},
        "head_sharded",
        [0, 2, 4],
        [0, 1, 2],
    ),
    # When kv heads divide, head-sharded is plain TP.
    "llama_gqa_head_sharded": ("llama", {}, "head_sharded", [0, 1], [0]),
}


def _worker(rank: int, world: int, jobs: dict[str, tuple[str, str]]) -> dict:
    group = dist.group.WORLD
    batch = packed_batch(lengths=[5, 11, 3], starts=[0, 25, 0])
    results = {}
    for name, (path, layout) in jobs.items():
        full, _ = load_model(path)
        expected = our_logits(full, batch)
        model, _ = load_model(path)
        (parallelize_tp if layout == "tp" else parallelize_head_sharded)(model, group)
        attn = model.model.layers[1].self_attn
        results[name] = {
            "max_diff": (our_logits(model, batch) - expected).abs().max().item(),
            "q_heads": attn.q_head_ids,
            "kv_heads": attn.kv_head_ids,
            "local_counts": [attn.num_heads, attn.num_kv_heads],
            "q_rows": attn.q_proj.weight.shape[0],
        }
    return results


def _run_ranks(jobs: dict[str, tuple[str, str]]) -> list[dict]:
    # results come back through a queue; a hang fails after TIMEOUT_S instead of blocking CI
    return run_ranks(_worker, WORLD, jobs, timeout=TIMEOUT_S, threads=1)


def test_tp_and_head_sharded_match_single_process(tmp_path: Path) -> None:
    jobs = {}
    for name, (kind, overrides, layout, _, _) in CASES.items():
        _, path = save_tiny(tmp_path / name, kind, **overrides)
        jobs[name] = (str(path), layout)
    ranks = _run_ranks(jobs)
    for name, (_, overrides, _, q0, kv0) in CASES.items():
        for rank, res in enumerate(ranks):
            assert res[name]["max_diff"] < 1e-4, (name, rank, res[name])
        assert ranks[0][name]["q_heads"] == q0 and ranks[0][name]["kv_heads"] == kv0, name
        all_q = sorted(ranks[0][name]["q_heads"] + ranks[1][name]["q_heads"])
        num_heads = overrides.get("num_attention_heads", 4)
        assert all_q == list(range(num_heads)), f"{name}: every q head on exactly one rank"
        assert ranks[1][name]["local_counts"] == [len(q0), len(kv0)]


class _FakeGroup:
    """parallelize_* read only size()/rank() of the group before forward."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_tp_refuses_indivisible_heads(tmp_path: Path) -> None:
    _, path = save_tiny(tmp_path, "llama", num_attention_heads=6, num_key_value_heads=3)
    model, _ = load_model(path)
    with pytest.raises(
        ValueError,
        match=r"num_heads \(6\) and num_kv_heads \(3\) divisible by 2; .*"
        r"parallelize_head_sharded",
    ):
        parallelize_tp(model, _FakeGroup(2, 0))
    with pytest.raises(ValueError, match=r"cannot shard 6 q heads / 3 kv heads over 4 ranks"):
        parallelize_head_sharded(model, _FakeGroup(4, 1))
    parallelize_head_sharded(model, _FakeGroup(3, 1))  # plain TP: one kv head per rank
    attn = model.model.layers[0].self_attn
    assert (attn.q_head_ids, attn.kv_head_ids) == ([2, 3], [1])
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize_tp(model, _FakeGroup(3, 1))


# ---- head_shard -----------------------------------------------------------------------------


def test_head_shard_layouts() -> None:
    # num_kv_heads % world == 0: contiguous blocks, as plain TP.
    assert head_shard(8, 4, 2, 1) == ([4, 5, 6, 7], [2, 3])
    # Head-sharded layout: 3 kv heads, group size 4, world 4 -> one q head of every group per rank.
    assert head_shard(12, 3, 4, 1) == ([1, 5, 9], [0, 1, 2])
    # In between: 2 kv heads, world 4 -> kv split 2 ways, each group's 4 q heads 2 ways.
    assert head_shard(8, 2, 4, 1) == ([2, 3], [0])
    assert head_shard(16, 4, 8, 3) == ([6, 7], [1])
    # SmolLM2 (9 q / 3 kv) works on 3 ranks, not on 2.
    assert head_shard(9, 3, 3, 2) == ([6, 7, 8], [2])
    with pytest.raises(ValueError, match=r"cannot shard 9 q heads / 3 kv heads over 2 ranks"):
        head_shard(9, 3, 2, 0)


@given(num_kv=st.integers(1, 8), group=st.integers(1, 8), world=st.integers(1, 8))
def test_head_shard_partitions_q_heads_and_keeps_gqa_mapping(num_kv: int, group: int, world: int) -> None:
    num_heads = num_kv * group
    try:
        shards = [head_shard(num_heads, num_kv, world, r) for r in range(world)]
    except ValueError:
        # No valid layout exists iff the q slices per group, world // gcd, do not divide it.
        import math

        assert group % (world // math.gcd(num_kv, world)) != 0
        return
    assert sorted(q for qs, _ in shards for q in qs) == list(range(num_heads))
    for q_ids, kv_ids in shards:
        assert len(q_ids) == num_heads // world and len(q_ids) % len(kv_ids) == 0
        ratio = len(q_ids) // len(kv_ids)
        # Local q head i must read local kv head i // ratio, its own KV group.
        assert all(q // group == kv_ids[i // ratio] for i, q in enumerate(q_ids))
