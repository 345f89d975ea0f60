"""The cost model's counts: bytes per strategy equal what seqpar's counted collectives record in a
real multi-process run, FLOPs equal direct counts, and the one calibrated factor predicts Meta's
other published points within 15%."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from seqpar import ShardPlan, sp_attention
from seqpar.comm.collectives import STATS
from seqpar.comm.launch import run_ranks
from seqpar.costmodel import Layout, predict, preset_config
from seqpar.costmodel import formulas as f
from seqpar.costmodel.calibrate import CALIBRATION_POINT, META_405B_H100, calibrate_gemm_efficiency, point_ttft
from seqpar.costmodel.hardware import H100, H200, Hardware
from seqpar.strategies.allgather import allgather_bytes
from seqpar.strategies.pass_q import pass_q_bytes
from seqpar.strategies.ring import ring_bytes

D = 8


def _measured_bytes(rank: int, world: int) -> list[tuple]:
    """(strategy, dtype, lens, measured, predicted) for ragged batches, GQA and MQA, fp32 and bf16."""
    rows = []
    cases = itertools.product(([9, 4, 1], [2], [7, 7, 3]), ((12, 4), (6, 1)), (torch.float32, torch.bfloat16))
    for lens, (hq, hkv), dtype in cases:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(sum(lens), h, D, generator=gen).to(dtype) for h in (hq, hkv, hkv))
        plan = ShardPlan(seq_lens=lens, world_size=world, scheme="zigzag")
        idx = plan.local_indices(rank)
        b = torch.tensor([], dtype=dtype).element_size()
        for strategy in ("ring", "pass_q", "allgather", "ulysses"):
            if strategy == "ulysses" and hq % world:
                continue
            STATS.reset()
            sp_attention(q[idx], k[idx], v[idx], plan=plan, group=None, strategy=strategy)
            predicted = f.attention_bytes(strategy, plan.local_counts, rank, hq, hkv, D, b)
            rows.append((strategy, str(dtype), lens, STATS.total, predicted))
    return rows


@pytest.mark.parametrize("world", [2, 3])
def test_strategy_bytes_equal_counted_collectives(world):
    for rows in run_ranks(_measured_bytes, world):
        assert rows and all(measured == predicted for *_, measured, predicted in rows), [
            r for r in rows if r[-2] != r[-1]
        ]


def test_byte_formulas_by_hand():
    # 2 ranks holding 5 and 3 tokens, 4 q heads, 2 kv heads, D 8, bf16.
    counts = [5, 3]
    assert ring_bytes(counts, 0, 2, 8, 2) == 2 * 5 * 2 * 8 * 2
    assert pass_q_bytes(counts, 1, 4, 8, 2) == 3 * 4 * 8 * 2 + 5 * 4 * 9 * 4  # Q out, rank 0's partial home
    assert allgather_bytes(counts, 2, 8, 2) == 5 * 2 * 2 * 8 * 2  # padded to the larger shard
    assert f.all_reduce_bytes(1000, 4) == 1500
    assert f.decode_merge_bytes(4, 8, 3) == 2 * 4 * 9 * 4
    assert f.attention_bytes("ring", [7], 0, 4, 2, 8, 2) == 0


def test_flops_equal_direct_counts():
    mc = preset_config("smollm2-135m")
    # causal pairs: count the mask directly
    for new, cached in ((1, 0), (7, 0), (5, 11)):
        mask = torch.ones(new, cached + new).tril(diagonal=cached)
        assert f.causal_pairs(new, cached) == int(mask.sum())
    # a zigzag plan's per-rank causal work sums to the whole triangle
    plan = ShardPlan(seq_lens=[100], world_size=4)
    assert sum(plan.causal_work(r) for r in range(4)) == f.causal_pairs(100)
    # linear FLOPs = 2 x parameters of the decoder's matmuls, counted from a built model
    from seqpar.model.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(mc)
    matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers") and p.dim() == 2)
    assert f.linear_params_per_layer(mc) * mc.num_layers == matmul
    assert f.weight_params(mc) == sum(p.numel() for p in model.parameters() if p.dim() == 2)  # tied: counted once
    assert f.linear_flops(mc, 10) == 2 * 10 * matmul
    assert f.attention_flops(mc, 6) == 4 * 64 * 9 * 6 * 30
    assert f.kv_bytes_per_token(mc, 1, 4) == 2 * 30 * 3 * 64 * 4  # SmolLM2 fp32: 46,080 bytes per token
    assert f.kv_bytes_per_token(preset_config("llama-3.1-405b"), 16, 2) == 2 * 126 * 1 * 128 * 2  # replicated KV head
    gemma, layer = preset_config("gemma-3-1b"), 2 * 256 * 2  # 4 global layers, 22 with a window of 512
    assert f.kv_bytes_per_rank(gemma, 1, 2, 32768, 2) == layer * (4 * 16384 + 22 * 512)
    assert f.kv_bytes_per_rank(gemma, 1, 2, 300, 1) == layer * 26 * 300  # shorter than the window
    assert f.kv_bytes_per_rank(mc, 1, 4, 1000, 4) == f.kv_bytes_per_token(mc, 1, 4) * 250


def test_presets_are_the_published_shapes():
    for name, params in (("llama-3.1-8b", 8.03e9), ("llama-3.1-70b", 70.6e9), ("llama-3.1-405b", 405.9e9)):
        total = f.weight_params(preset_config(name))  # norms (a few million) left out
        assert abs(total / params - 1) < 0.005, (name, total)


def test_one_calibrated_factor_predicts_the_other_published_points():
    mc = preset_config("llama-3.1-405b")
    factor = calibrate_gemm_efficiency(mc, H100, CALIBRATION_POINT)
    assert factor == pytest.approx(H100.gemm_efficiency, abs=5e-4)  # the preset holds the calibrated value
    for point in META_405B_H100:
        ratio = point_ttft(mc, H100, point) / point.ttft_s
        assert 0.85 <= ratio <= 1.15, (point.label, ratio)


def test_ring_hides_its_transfers_only_when_compute_is_long_enough():
    mc = preset_config("llama-3.1-8b")
    slow = replace(H100, inter_bandwidth=1e9)
    long = predict(mc, H100, Layout(8, 4, 8), "ring", 262144)  # 33.5 MB blocks: 0.7 ms at 50 GB/s, 6 ms of attention
    short = predict(mc, slow, Layout(8, 4, 8), "ring", 4096)  # 1 GB/s: the transfers stick out
    assert long.cp_comm_exposed_s < 0.01 * long.ttft_s
    assert short.cp_comm_exposed_s > 0.5 * short.attention_s
    gathered = predict(mc, H100, Layout(8, 4, 8), "allgather", 262144)
    assert gathered.cp_comm_exposed_s > 0  # all-gather never overlaps


def test_hardware_profile_from_json(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(replace(H200, name="cpu").to_json())
    assert Hardware.from_json(path) == replace(H200, name="cpu")
    path.write_text('{"name": "x", "peak_flops": 1}')
    with pytest.raises(ValueError, match="missing: \\['attention_efficiency'"):
        Hardware.from_json(path)
    with pytest.raises(ValueError, match="gemm_efficiency is a share of peak"):
        replace(H100, gemm_efficiency=2.0)


def test_sliding_window_layers_in_the_formulas_and_plan():
    for new, cached, w in ((7, 0, 3), (5, 11, 4), (20, 3, 100), (9, 2, 1)):
        mask = torch.ones(new, cached + new).tril(diagonal=cached).triu(diagonal=cached - w + 1)
        assert f.window_pairs(new, cached, w) == int(mask.sum())
    mc = preset_config("gemma-3-1b")
    assert abs(f.weight_params(mc) / 1.0e9 - 1) < 0.01  # "1B"
    assert mc.layer_types.count("full_attention") == 4  # layers 5, 11, 17, 23; the other 22 slide over 512
    t = 32768
    assert f.prefill_attention_flops(mc, t) == 4 * 256 * 4 * (4 * f.causal_pairs(t) + 22 * f.window_pairs(t, 0, 512))
    assert f.kv_read_bytes(mc, 1, 2, t) == 2 * 256 * 2 * (4 * t + 22 * 512)
    every_global = replace(mc, layer_types=(), sliding_window=None)
    assert f.prefill_attention_flops(every_global, t) == f.attention_flops(every_global, f.causal_pairs(t))
    windowed, whole = (predict(m, H200, Layout(1, 1, 8), "local", t) for m in (mc, every_global))
    assert windowed.attention_s < whole.attention_s / 5  # 4 of 26 layers pay T^2 / 2
    assert windowed.decode_ms_per_token < whole.decode_ms_per_token
    # the cache keeps a window layer's last window only
    assert windowed.kv_bytes_per_rank == 2 * 256 * 2 * (4 * t + 22 * 512) < whole.kv_bytes_per_rank / 5
    # memory for 8,000 tokens of every layer beside the weights holds the model's whole context windowed
    weights = f.weight_params(mc) * 2
    small = replace(H200, memory_bytes=(weights + 8000 * f.kv_bytes_per_token(mc, 1, 2)) / H200.memory_fraction)
    windowed, whole = (predict(m, small, Layout(1, 1, 8), "local", t) for m in (mc, every_global))
    assert 7990 < whole.max_context_tokens <= 8000 and windowed.max_context_tokens == mc.max_position_embeddings
    # 4,000 tokens of every layer: T tokens of the 4 global layers and 512 of the other 22 fit
    small = replace(H200, memory_bytes=(weights + 4000 * f.kv_bytes_per_token(mc, 1, 2)) / H200.memory_fraction)
    windowed = predict(mc, small, Layout(1, 1, 8), "local", t)
    assert abs(windowed.max_context_tokens - (4000 * 26 - 22 * 512) / 4) < 30
