"""Single-device kernels against the dense reference, and the LSE merge's algebra."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpar import TokenLayout, attention_with_lse, merge_states, reference_attention
from seqpar.kernels.merge import merge_many


@st.composite
def packed_case(draw):
    """A ragged batch, then a query subset and a key subset in a drawn row order."""
    lens = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    seq = [s for s, n in enumerate(lens) for _ in range(n)]
    pos = [p for n in lens for p in range(n)]
    t = len(seq)
    order = draw(st.sampled_from(["packed", "striped", "zigzag", "shuffled"]))
    rows = list(range(t))
    if order == "striped":
        rows.sort(key=lambda i: (pos[i] % 3, i))
    elif order == "zigzag":
        rows.sort(key=lambda i: min(pos[i] // 2 % 4, 3 - pos[i] // 2 % 4))
    elif order == "shuffled":
        rows = draw(st.permutations(rows))
    q_rows = rows[: draw(st.integers(1, t))]
    k_rows = rows[draw(st.integers(0, t - 1)) :]
    hkv = draw(st.sampled_from([1, 2, 6]))
    return seq, pos, q_rows, k_rows, hkv, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(packed_case())
def test_attention_with_lse_matches_reference(case) -> None:
    seq, pos, q_rows, k_rows, hkv, causal = case
    seq_t, pos_t = torch.tensor(seq), torch.tensor(pos)
    qi, ki = torch.tensor(q_rows), torch.tensor(k_rows)
    gen = torch.Generator().manual_seed(len(seq))
    q = torch.randn(len(seq), 6, 8, generator=gen)[qi]
    k = torch.randn(len(seq), hkv, 8, generator=gen)[ki]
    v = torch.randn(len(seq), hkv, 8, generator=gen)[ki]
    ql, kl = TokenLayout.build(seq_t[qi], pos_t[qi]), TokenLayout.build(seq_t[ki], pos_t[ki])
    out, lse = attention_with_lse(q, k, v, ql, kl, causal)
    ref_out, ref_lse = reference_attention(q, k, v, ql, kl, causal)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    blind = torch.isinf(ref_lse)  # rows that see no key: lse -inf, out 0
    assert torch.equal(torch.isinf(lse), blind) and (lse[blind] < 0).all()
    assert (out[blind.unsqueeze(-1).expand_as(out)] == 0).all()
    # fp32, blockwise vs dense softmax: summation order only
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[~blind], ref_lse[~blind], atol=1e-5, rtol=0)


def test_long_causal_block_uses_fused_kernel_exactly() -> None:
    t = 300
    q, k, v = torch.randn(t, 4, 32), torch.randn(t, 2, 32), torch.randn(t, 2, 32)
    lay = TokenLayout.build([0] * t, list(range(t)))
    out, lse = attention_with_lse(q, k, v, lay, lay)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 1), (6, 6)])
def test_chunk_over_prefix_runs_coalesce_exactly(hq: int, hkv: int) -> None:
    """A chunk's queries over a prefix cut into many runs (zigzag units) that sit next to each
    other in K/V: one unmasked kernel call over all of them (GQA groups folded into rows), then
    the chunk's own causal square; equal to the dense reference."""
    unit, units, chunk = 16, 7, 40
    n = units * unit + chunk
    gen = torch.Generator().manual_seed(hq)
    q, k, v = (
        torch.randn(n, hq, 32, generator=gen),
        torch.randn(n, hkv, 32, generator=gen),
        torch.randn(n, hkv, 32, generator=gen),
    )
    # Keys: the prefix's units in a shuffled-by-unit order (as one rank's cache holds them), then the chunk.
    order = [u * unit + i for u in (0, 2, 4, 6, 1, 3, 5) for i in range(unit)] + list(range(units * unit, n))
    ki = torch.tensor(order)
    qi = torch.arange(units * unit, n)
    ql = TokenLayout.build([0] * chunk, qi.tolist())
    kl = TokenLayout.build([0] * n, order)
    out, lse = attention_with_lse(q[qi], k[ki], v[ki], ql, kl, causal=True)
    ref_out, ref_lse = reference_attention(q[qi], k[ki], v[ki], ql, kl, True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


finite = st.floats(-30, 30)
lse_values = st.one_of(finite, st.just(-math.inf))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(lse_values, lse_values), min_size=1, max_size=4), st.integers(0, 2**16))
def test_merge_states_is_exact_and_inf_safe(lses, seed) -> None:
    """Merging partial results over two key sets equals attention over the union."""
    gen = torch.Generator().manual_seed(seed)
    la = torch.tensor([a for a, _ in lses]).unsqueeze(-1)  # [T, 1]
    lb = torch.tensor([b for _, b in lses]).unsqueeze(-1)
    oa = torch.randn(len(lses), 1, 3, generator=gen) * (~torch.isinf(la)).unsqueeze(-1)
    ob = torch.randn(len(lses), 1, 3, generator=gen) * (~torch.isinf(lb)).unsqueeze(-1)
    out, lse = merge_states(oa, la, ob, lb)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    expected_lse = torch.logaddexp(la.double(), lb.double())
    wa = torch.nan_to_num(torch.exp(la.double() - expected_lse), nan=0.0).unsqueeze(-1)
    wb = torch.nan_to_num(torch.exp(lb.double() - expected_lse), nan=0.0).unsqueeze(-1)
    torch.testing.assert_close(out.double(), oa.double() * wa + ob.double() * wb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse)
    # merging is symmetric, and merge_many agrees
    out2, lse2 = merge_states(ob, lb, oa, la)
    torch.testing.assert_close(out, out2)
    out3, lse3 = merge_many(torch.stack([oa, ob]), torch.stack([la, lb]))
    torch.testing.assert_close(out3, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse3, lse, atol=1e-5, rtol=1e-5)


def test_split_keys_then_merge_equals_whole() -> None:
    t = 17
    lay = TokenLayout.build([0] * t, list(range(t)))
    q, k, v = torch.randn(t, 2, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    whole = attention_with_lse(q, k, v, lay, lay)
    a_lay, b_lay = TokenLayout.build([0] * 5, range(5)), TokenLayout.build([0] * 12, range(5, 17))
    oa, la = attention_with_lse(q, k[:5], v[:5], lay, a_lay)
    ob, lb = attention_with_lse(q, k[5:], v[5:], lay, b_lay)
    out, lse = merge_states(oa, la, ob, lb)
    torch.testing.assert_close(out, whole[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_batch_one_call_per_bucket_matches_reference(dtype, atol) -> None:
    """Decode rows over scattered cache slots, ragged (0, 1, 37, 50, 200 keys): padded, masked, bucketed.
    fp32 within summation order; bf16 within its rounding of the output (2^-8 relative)."""
    from seqpar.kernels.attention import reference_block
    from seqpar.kernels.decode import DecodeBatch

    gen = torch.Generator().manual_seed(0)
    kh, vh = (torch.randn(3, 500, 8, generator=gen).to(dtype) for _ in range(2))  # [Hkv, S, D]
    q = torch.randn(5, 6, 8, generator=gen).to(dtype)  # [B, Hq, D]
    slots = [torch.randperm(500, generator=gen)[:n] for n in (37, 0, 200, 1, 50)]
    batch = DecodeBatch(slots)
    assert len(batch.buckets) == 3  # 37 and 50 share one (same power of two); no call for 0 keys
    assert batch.in_place[:2] == [None, None]  # scattered slots gathered (the one-key row: in place)
    out, lse = batch.attend(q, kh, vh, 8**-0.5)
    assert out.dtype == lse.dtype == torch.float32
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()  # no key on this rank: merges ignore it
    for b, s in enumerate(slots):
        if len(s):
            want, want_lse = reference_block(
                q[b : b + 1], kh[:, s].transpose(0, 1), vh[:, s].transpose(0, 1), False, 8**-0.5
            )
            assert torch.allclose(out[b], want[0].float(), atol=atol, rtol=0)
            assert torch.allclose(lse[b], want_lse[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_batch_reads_consecutive_slots_in_place(dtype, atol) -> None:
    """One sequence's slots as allocated (consecutive), and two evenly spaced sequences of one
    length: the kernel reads the storage as a strided view, no gather, with the gather's result."""
    from seqpar.kernels.attention import reference_block
    from seqpar.kernels.decode import DecodeBatch

    gen = torch.Generator().manual_seed(1)
    kh, vh = (torch.randn(3, 500, 8, generator=gen).to(dtype) for _ in range(2))
    for slots in ([torch.arange(100, 300)], [torch.arange(0, 64), torch.arange(128, 192)]):
        q = torch.randn(len(slots), 6, 8, generator=gen).to(dtype)
        batch = DecodeBatch(slots)
        assert batch.in_place == [(int(slots[0][0]), 128 if len(slots) > 1 else 200)]
        out, lse = batch.attend(q, kh, vh, 8**-0.5)
        assert not batch.workspace  # nothing gathered
        for b, s in enumerate(slots):
            want, want_lse = reference_block(
                q[b : b + 1], kh[:, s].transpose(0, 1), vh[:, s].transpose(0, 1), False, 8**-0.5
            )
            assert torch.allclose(out[b], want[0].float(), atol=atol, rtol=0)
            assert torch.allclose(lse[b], want_lse[0], atol=1e-4, rtol=0)
    scattered = DecodeBatch([torch.tensor([5, 6, 9]), torch.arange(20, 23)])
    assert scattered.in_place == [None]  # a gap in a row's slots: gathered


def test_each_device_has_its_backend() -> None:
    from seqpar.kernels.backends import CPU, TORCH, TRITON, backend_for

    assert backend_for("cpu") is backend_for(torch.device("cpu")) is CPU
    assert backend_for("cuda") is backend_for(torch.device("cuda", 1)) is TRITON
    assert backend_for("meta") is TORCH
    assert not CPU.paged_decode and TRITON.paged_decode and TRITON.static_decode and not CPU.static_decode


@pytest.mark.parametrize("hkv", [1, 2, 6])  # MQA, GQA, MHA
@pytest.mark.parametrize("kind", ["causal", "full", "masked"])
def test_backend_blocks_match_the_reference(hkv: int, kind: str) -> None:
    """Every backend that runs on CPU tensors (the CPU flash op, plain torch) against the fp32
    reference on one block: a causal square, every key, and a sliding window's explicit mask."""
    from seqpar.kernels.attention import reference_block
    from seqpar.kernels.backends import CPU, TORCH

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(24, h, 16, generator=g) for h in (6, hkv, hkv))
    d = torch.arange(24)[:, None] - torch.arange(24)[None, :]
    visible = ((d >= 0) & (d < 5)) if kind == "masked" else None
    want = reference_block(q, k, v, kind == "causal", 0.25, mask=visible)
    for backend in (CPU, TORCH):
        kh, vh = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
        out, lse = backend.block(q, kh, vh, kind == "causal", 0.25, visible)
        torch.testing.assert_close(out, want[0], atol=2e-5, rtol=0, msg=backend.name)
        torch.testing.assert_close(lse, want[1], atol=2e-5, rtol=0, msg=backend.name)


@pytest.mark.parametrize("kind", ["causal", "full", "masked"])
def test_cuda_block_wraps_the_sdpa_layout(monkeypatch, kind: str) -> None:
    """The triton backend's block on CPU tensors, its SDPA op swapped for the CPU flash op of the same
    layout ([1, H, L, D] in, out and LSE [1, H, L] back): the wrapper's transposes, GQA and LSE slices
    against the reference (the kernels themselves: tests/test_gpu.py on a GPU)."""
    from seqpar.kernels.attention import reference_block
    from seqpar.kernels.gpu import flash

    def cpu_sdpa(q, k, v, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal=causal, scale=scale)[
            :2
        ]

    monkeypatch.setattr(flash, "flash_lse", cpu_sdpa)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(20, h, 16, generator=g) for h in (6, 2, 2))
    d = torch.arange(20)[:, None] - torch.arange(20)[None, :]
    visible = ((d >= 0) & (d < 6)) if kind == "masked" else None
    want = reference_block(q, k, v, kind == "causal", 0.3, mask=visible)
    out, lse = flash.cuda_block(q, k.transpose(0, 1), v.transpose(0, 1), kind == "causal", 0.3, visible)
    torch.testing.assert_close(out, want[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(lse, want[1], atol=2e-5, rtol=0)
