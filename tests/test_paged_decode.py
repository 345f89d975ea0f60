"""Decode attention through a block table (seqpar.kernels.gpu.paged, triton_decode) against the dense
reference: ragged rows (0, 1, a page and a half, many pages), pages scattered in storage, GQA, MQA
and MHA, split counts from 1 to more ranges than a row has keys, and W = 1-4 ranks' partials merged
by LSE. Without a GPU the Triton kernel runs under Triton's interpreter (tests/conftest.py).

Tolerances: fp32 differs from the reference by summation order only (~1e-6; 2e-5 with room). In
bf16 the inputs are rounded alike on both sides and the kernel multiplies the softmax weights,
rounded to bf16, by V (as flash kernels do): ~2^-8 relative on outputs of magnitude ~1, so 2e-2;
the LSE is accumulated in fp32 from the same inputs, 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels.attention import reference_block
from seqpar.kernels.gpu.paged import page_table, paged_decode_torch, triton_unusable
from seqpar.kernels.merge import merge_many

triton_decode = pytest.importorskip("seqpar.kernels.gpu.triton_decode", reason="Triton is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UNUSABLE = triton_unusable(DEVICE)  # why Triton cannot run here, or None
pytestmark = pytest.mark.skipif(UNUSABLE is not None, reason=str(UNUSABLE))

PAGE = 4


def _case(lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    """Storage [Hkv, S, D] with every row's pages drawn at random from it, and a table."""
    gen = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-n // PAGE) for n in lens) + 5
    k = torch.randn(hkv, num_pages * PAGE, d, generator=gen).to(dtype)
    v = torch.randn(hkv, num_pages * PAGE, d, generator=gen).to(dtype)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    pages, i = [], 0
    for n in lens:
        pages.append(perm[i : i + -(-n // PAGE)])
        i += len(pages[-1])
    return q, k, v, pages


def _reference(q, k, v, pages, lens, scale):
    """Each row alone, dense, fp32; a row with no key: out 0, lse -inf."""
    outs, lses = [], []
    for b, (p, n) in enumerate(zip(pages, lens)):
        slots = torch.cat([torch.arange(x * PAGE, x * PAGE + PAGE) for x in p] or [torch.empty(0, dtype=torch.long)])
        slots = slots[:n]
        if n == 0:
            outs.append(torch.zeros(q.shape[1:]))
            lses.append(torch.full(q.shape[1:2], float("-inf")))
            continue
        o, l = reference_block(q[b : b + 1].float(), k[:, slots].transpose(0, 1).float(),
                               v[:, slots].transpose(0, 1).float(), False, scale)  # fmt: skip
        outs.append(o[0])
        lses.append(l[0])
    return torch.stack(outs), torch.stack(lses)


def _run(kernel, q, k, v, pages, lens, scale, splits):
    t, n = page_table(pages).to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    if kernel == "torch":
        out, lse = paged_decode_torch(q, k, v, t, n, PAGE, scale)
    else:
        out, lse = triton_decode.paged_decode(q, k, v, t, n, PAGE, scale, splits, block_n=16)
    return out.cpu(), lse.cpu()


def _close(out, lse, ref_out, ref_lse, atol, lse_atol):
    assert not out.isnan().any() and not lse.isnan().any()
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)  # -inf exactly where a row saw no key
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=lse_atol, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype, atol, lse_atol", [(torch.float32, 2e-5, 2e-5), (torch.bfloat16, 2e-2, 1e-3)])
@pytest.mark.parametrize("hq, hkv", [(6, 2), (4, 1), (3, 3)])  # GQA, MQA, MHA
@pytest.mark.parametrize("kernel, splits", [("triton", 1), ("triton", 3), ("triton", 16), ("torch", 1)])
def test_paged_decode_matches_reference(dtype, atol, lse_atol, hq, hkv, kernel, splits):
    lens = [0, 1, 6, 37, 4]
    q, k, v, pages = _case(lens, hq, hkv, 32, dtype)
    ref_out, ref_lse = _reference(q, k, v, pages, lens, 0.3)
    out, lse = _run(kernel, q, k, v, pages, lens, 0.3, splits)
    _close(out, lse, ref_out, ref_lse, atol, lse_atol)


@pytest.mark.parametrize("kernel, splits", [("triton", 1), ("triton", 3), ("torch", 1)])
def test_a_sliding_windows_rows_read_from_their_start(kernel, splits):
    """Rows that see keys [start, len) only (a sliding-window layer): the pages wholly before the start
    are listed as page 0 (freed in the engine) and never count; a start at the length: no key."""
    lens, starts = [6, 37, 37, 9, 5], [0, 3, 30, 8, 5]
    q, k, v, pages = _case(lens, 6, 2, 32, torch.float32, seed=2)
    want_out, want_lse = [], []
    for b, (p, n, st) in enumerate(zip(pages, lens, starts)):
        o, l = _reference(q[b : b + 1], k, v, [p], [n], 0.3) if st == 0 else _window_reference(q[b], k, v, p, n, st)
        want_out.append(o[0])
        want_lse.append(l[0])
    freed = [[0 if (i + 1) * PAGE <= st else x for i, x in enumerate(p)] for p, st in zip(pages, starts)]
    t, n = page_table(freed).to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    first = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    if kernel == "torch":
        out, lse = paged_decode_torch(q, k, v, t, n, PAGE, 0.3, first)
    else:
        out, lse = triton_decode.paged_decode(q, k, v, t, n, PAGE, 0.3, splits, block_n=16, starts=first)
    _close(out.cpu(), lse.cpu(), torch.stack(want_out), torch.stack(want_lse), 2e-5, 2e-5)


def _window_reference(q, k, v, pages, n, start):
    slots = torch.cat([torch.arange(x * PAGE, x * PAGE + PAGE) for x in pages])[start:n]
    if not len(slots):
        return torch.zeros(1, *q.shape), torch.full((1, q.shape[0]), float("-inf"))
    return reference_block(q[None].float(), k[:, slots].transpose(0, 1).float(), v[:, slots].transpose(0, 1).float(),
                           False, 0.3)  # fmt: skip


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_partials_merge_to_the_whole(world):
    """SP decode: each rank holds some of a row's pages (here every world-th); its partial over
    them, merged by LSE over the ranks, is attention over all of them. A rank may hold none of a
    short row's keys."""
    lens = [3, 17, 40]
    q, k, v, pages = _case(lens, 6, 2, 32, torch.float32, seed=1)
    ref_out, ref_lse = _reference(q, k, v, pages, lens, 0.25)
    outs, lses = [], []
    for r in range(world):
        mine = [[p for i, p in enumerate(ps) if i % world == r] for ps in pages]
        # only a row's last page is partial: a rank holding it holds it last
        counts = [sum(min(PAGE, n - i * PAGE) for i in range(len(ps)) if i % world == r) for ps, n in zip(pages, lens)]
        o, l = _run("triton", q, k, v, mine, counts, 0.25, 2)
        outs.append(o)
        lses.append(l)
    out, lse = merge_many(torch.stack(outs), torch.stack(lses))
    _close(out, lse, ref_out, ref_lse, 2e-5, 2e-5)
