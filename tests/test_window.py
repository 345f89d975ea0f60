"""Sliding-window attention (Gemma 3, Mistral): the kernels' window rule against the dense reference.

A query at position p sees keys at positions (p - window, p] of its own sequence (transformers'
`sliding_window_overlay`). fp32 on small shapes: the tiled flash path and the dense softmax agree
to ~1e-6; 1e-5 leaves room for the merge's exp/log.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels.attention import attention_with_lse, reference_attention
from seqpar.kernels.layout import Run, TokenLayout


def _check(q_runs, k_runs, window, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ql, kl = TokenLayout.from_runs(q_runs), TokenLayout.from_runs(k_runs)
    q = torch.randn(len(ql), hq, d, generator=g)
    k = torch.randn(len(kl), hkv, d, generator=g)
    v = torch.randn(len(kl), hkv, d, generator=g)
    out, lse = attention_with_lse(q, k, v, ql, kl, True, None, window)
    ref, ref_lse = reference_attention(q, k, v, ql, kl, True, None, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    return lse


@pytest.mark.parametrize("window", [1, 3, 16, 100, 700])
def test_prompt_against_itself(window):
    # two sequences, one longer than two tiles, the other shorter than the window
    runs = [Run(0, 600, 0, 0, 1), Run(600, 37, 1, 0, 1)]
    _check(runs, runs, window)


@pytest.mark.parametrize("window", [1, 5, 64, 1000])
def test_chunk_over_a_cached_prefix_in_blocks(window):
    # queries 300..419 of one sequence; its keys 0..419 in blocks of 16 scattered over the storage
    q_runs = [Run(0, 120, 0, 300, 1)]
    order = torch.randperm(27, generator=torch.Generator().manual_seed(1)).tolist()
    k_runs = sorted(
        (Run(slot * 16, min(16, 420 - b * 16), 0, b * 16, 1) for b, slot in zip(range(27), order)),
        key=lambda r: r.start,  # rows in storage order, so the reference's layout indexes them
    )
    k_runs = [Run(sum(r.length for r in k_runs[:i]), r.length, 0, r.pos, 1) for i, r in enumerate(k_runs)]
    _check(q_runs, k_runs, window, seed=window)


@pytest.mark.parametrize("window", [2, 7, 40])
def test_strided_runs_and_rows_that_see_nothing(window):
    # striped: queries at even positions, keys at odd ones of another rank's share; a window of 2
    # leaves every query one key, of 1 none (lse -inf, out 0)
    q_runs = [Run(0, 50, 0, 0, 2)]
    k_runs = [Run(0, 50, 0, 1, 2)]
    _check(q_runs, k_runs, window)
    lse = _check(q_runs, k_runs, 1)
    assert torch.isinf(lse).all()


@pytest.mark.parametrize("strided", [False, True])
def test_nothing_built_on_the_host_meets_the_device(strided):
    """Window attention keeps positions and masks on the host; each must reach q's device before an
    op meets a device tensor. PyTorch's meta device (shapes only, on the torch backend) refuses a
    host tensor in an op as CUDA does, so this finds on CPU what only a GPU would show: full and
    strided runs (the masked paths of fused and plain blocks)."""
    q_runs = [Run(0, 50, 0, 0, 2)] if strided else [Run(0, 40, 0, 0, 1)]
    k_runs = [Run(0, 50, 0, 1, 2)] if strided else q_runs
    ql, kl = TokenLayout.from_runs(q_runs), TokenLayout.from_runs(k_runs)
    q = torch.empty(len(ql), 4, 16, device="meta")
    k = torch.empty(len(kl), 2, 16, device="meta")
    out, lse = attention_with_lse(q, k, torch.empty_like(k), ql, kl, True, None, 7)
    assert out.device.type == lse.device.type == "meta" and out.shape == q.shape
