"""Decode attention over a paged cache in Triton: split over the keys ("flash decoding"), GQA native.

One query row per sequence (B rows), each over its own keys, read in place from the cache storage
through a block table: row b's key j sits at slot `table[b, j // block_size] * block_size +
j % block_size` of storage [Hkv, S, D]. Nothing is gathered or repeated. A sliding-window layer's
row reads its keys from `starts[b]` on.

Why split: a decode step has B x Hkv (row, KV head) pairs; at B = 1 that is 8 programs for a
Llama-3-8B layer, against 132 SMs on an H200, and each streams every key alone. Stage 1 cuts each
row's keys into `num_splits` ranges, one program per (row, KV head, range); it reads a KV head once
for its g query heads (the g rows are the M side of one small dot), and leaves each range's
normalised partial out and LSE. Stage 2 merges a row's ranges by their LSE, exactly as SP merges
ranks: l = log(sum_i exp(l_i)), o = sum_i exp(l_i - l) o_i. A range with no key (a short row, a
row of padding with 0 keys) has l_i = -inf and weight 0; a row with no key at all gets out 0 and
lse -inf, never NaN.

The grid is fixed by (B, Hkv, num_splits), not by the lengths, which live on the device (`lens`):
a captured CUDA graph replays the same launch for any lengths.

Runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1), which is how CI tests it;
there the dots run in fp32 (`F32`), since the interpreter's `tl.dot` misreads bf16 operands. On a GPU,
half types go to the tensor cores (the softmax weights rounded to V's type, as flash kernels do) and
fp32 stays IEEE fp32 (no TF32).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _split_kernel(
    Q, K, V, TABLE, LENS, STARTS, O_PART, L_PART,
    stride_qb, stride_qh,
    stride_kh, stride_ks,
    stride_vh, stride_vs,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, F32: tl.constexpr,
    HAS_STARTS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(LENS + b)
    first = 0  # keys before it are out of a sliding window (none without STARTS)
    if HAS_STARTS:
        first = tl.load(STARTS + b)
    # each range a whole number of BLOCK_N tiles: [lo, hi), the row's keys [first, n) cut in NUM_SPLITS
    per = tl.cdiv(tl.cdiv(n - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per
    hi = tl.minimum(lo + per, n)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < GROUP
    dmask = d < D
    heads = kvh * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], gmask[:, None] & dmask[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    # a for loop, which Triton software-pipelines (the next tiles' K/V loads in flight while this one
    # computes, `num_stages`); a while loop is not pipelined (tests/test_triton_compiles.py checks)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        valid = j < hi
        page = tl.load(TABLE + b * stride_tb + j // PAGE, valid, other=0).to(tl.int64)
        slot = page * PAGE + j % PAGE
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(K + kvh * stride_kh + slot[:, None] * stride_ks + d[None, :], kv_mask, other=0.0)
        if F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m, tl.max(s, 1))
        # a tile always holds a valid key (start < hi), so m_new is finite and nothing is -inf - -inf
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(V + kvh * stride_vh + slot[:, None] * stride_vs + d[None, :], kv_mask, other=0.0)
        if F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    seen = s_sum > 0
    out = acc / tl.where(seen, s_sum, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, s_sum, 1.0)), float("-inf"))
    o_ptr = O_PART + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptr, out, gmask[:, None] & dmask[None, :])
    tl.store(L_PART + b * stride_lb + heads * stride_lh + split, lse, gmask)


@triton.jit
def _merge_kernel(
    O_PART, L_PART, OUT, LSE,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    stride_lseb,
    D: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    imask = i < NUM_SPLITS
    dmask = d < D
    l_i = tl.load(L_PART + b * stride_lb + h * stride_lh + i, imask, other=float("-inf"))
    mx = tl.max(l_i, 0)
    seen = mx > float("-inf")
    w = tl.exp(l_i - tl.where(seen, mx, 0.0))  # 0 for empty ranges and padding (l_i = -inf)
    total = tl.sum(w, 0)
    o_i = tl.load(
        O_PART + b * stride_ob + h * stride_oh + i[:, None] * stride_os + d[None, :],
        imask[:, None] & dmask[None, :],
        other=0.0,
    )
    out = tl.sum(o_i * w[:, None], 0) / tl.where(seen, total, 1.0)
    tl.store(OUT + b * stride_outb + h * stride_outh + d, out, dmask)
    tl.store(LSE + b * stride_lseb + h, tl.where(seen, mx + tl.log(tl.where(seen, total, 1.0)), float("-inf")))


class Launch(NamedTuple):
    """One kernel launch: what `kernel[grid](*args, **constexprs)` takes."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]


def plan(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    table: Tensor,
    lens: Tensor,
    page: int,
    scale: float,
    num_splits: int,
    block_n: int | None = None,
    starts: Tensor | None = None,
    on_gpu: bool | None = None,
) -> tuple[Tensor, Tensor, list[Launch]]:
    """`paged_decode`'s outputs (allocated, not yet written) and the two launches that fill them:
    the split kernel, then the merge. Apart from the launching so that what runs is what
    tests/test_triton_compiles.py compiles for real GPUs (`on_gpu`: the launches a GPU would get;
    None: whether q is on one)."""
    if on_gpu is None:
        on_gpu = q.device.type == "cuda"
    # the interpreter's dots run in fp32 (module docstring); a GPU's in half types on the tensor cores
    f32 = q.dtype == torch.float32 or not on_gpu
    if block_n is None:
        # a GPU's IEEE fp32 dot spills registers past tiles of 16 keys (at D 128 and 256); half types
        # take 64 (tests/test_triton_compiles.py reads both from the compiled kernels)
        block_n = 16 if on_gpu and q.dtype == torch.float32 else 64
    bsz, hq, d = q.shape
    hkv = k_store.shape[0]
    if hq % hkv or k_store.shape[-1] != d or k_store.stride(-1) != 1 or v_store.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"paged_decode: q {tuple(q.shape)} over storage {tuple(k_store.shape)}: need Hq % Hkv == 0, "
                         "the same D, and D contiguous")  # fmt: skip
    group = hq // hkv
    o_part = q.new_empty(bsz, hq, num_splits, d, dtype=torch.float32)
    l_part = q.new_empty(bsz, hq, num_splits, dtype=torch.float32)
    out = q.new_empty(bsz, hq, d, dtype=torch.float32)
    lse = q.new_empty(bsz, hq, dtype=torch.float32)
    d_pad = max(16, triton.next_power_of_2(d))
    split = Launch(
        _split_kernel,
        (bsz, hkv, num_splits),
        (
            q, k_store, v_store, table, lens, lens if starts is None else starts, o_part, l_part,
            q.stride(0), q.stride(1),
            k_store.stride(0), k_store.stride(1),
            v_store.stride(0), v_store.stride(1),
            table.stride(0),
            o_part.stride(0), o_part.stride(1), o_part.stride(2),
            l_part.stride(0), l_part.stride(1),
            scale,
        ),
        dict(
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, D_PAD=d_pad,
            PAGE=page, BLOCK_N=block_n, NUM_SPLITS=num_splits,
            F32=f32,
            HAS_STARTS=starts is not None,  # (else `lens` stands in for the pointer, never read)
        ),
    )  # fmt: skip
    merge = Launch(
        _merge_kernel,
        (bsz, hq),
        (
            o_part, l_part, out, lse,
            o_part.stride(0), o_part.stride(1), o_part.stride(2),
            l_part.stride(0), l_part.stride(1),
            out.stride(0), out.stride(1),
            lse.stride(0),
        ),
        dict(D=d, D_PAD=d_pad, NUM_SPLITS=num_splits, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits))),
    )  # fmt: skip
    return out, lse, [split, merge]


def paged_decode(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    table: Tensor,
    lens: Tensor,
    page: int,
    scale: float,
    num_splits: int,
    block_n: int | None = None,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q [B, Hq, D]; k_store, v_store [Hkv, S, D] (a layer of the cache, head-major, D contiguous);
    table [B, max_pages] int32 (row b's pages in key order); lens [B] int32 (row b's keys: only its
    last listed page may be partial); starts [B] int32 (a sliding window's: row b reads its keys
    [starts[b], lens[b]) only, the pages before never touched; None: from 0); block_n keys a tile
    (None: `plan`'s choice) -> out [B, Hq, D] fp32, lse [B, Hq] fp32 (natural log)."""
    out, lse, launches = plan(q, k_store, v_store, table, lens, page, scale, num_splits, block_n, starts)
    if q.shape[0]:
        for kernel, grid, args, constexprs in launches:
            kernel[grid](*args, **constexprs)
    return out, lse
