"""Single-device attention with log-sum-exp over packed ragged batches.

Shapes: q [Tq, Hq, D]; k, v [Tk, Hkv, D] with Hq % Hkv == 0 (GQA/MQA); out
[Tq, Hq, D]; lse [Tq, Hq] fp32, natural log. A query row that sees no key has
lse = -inf and out = 0.

The work is cut into (query run, key run) pairs of the same sequence (see
`layout.py`). With the causal rule "key position <= query position", a pair whose
positions step by the same stride S is, in row/column space, j <= i + c with
c = floor((a - b) / S) (a, b the first positions). So:
- rows i < -c see nothing (skipped: never handed to a kernel, where a fully
  masked row would come back as lse = 0 instead of -inf);
- keys j >= m + c are never seen (cropped);
- the rest is keys [0, d) fully visible plus a square causal block on the
  diagonal from key d, d = i0 + c. Rows past that square see every key.
Fully masked pairs cost nothing: that is the block skipping of the causal ring.

A sliding window W (`window`) adds "key position > query position - W" (transformers' rule). A
pair then runs tile by tile over its queries, each tile against only the keys some row of it can
see, under an explicit mask; rows that see none of the pair's keys, and pairs no row reaches, are
skipped. A query's work is at most W + WINDOW_TILE keys, so a window layer costs T x W, not T^2 / 2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.kernels.backends import backend_for
from seqpar.kernels.layout import Run, TokenLayout
from seqpar.kernels.merge import merge_into
from seqpar.kernels.reference import reference_block
from seqpar.profiling import KERNEL, traced


@traced(KERNEL)  # the one entry of every dense block: a profiler range, not nested
def _fused_lse(
    q: Tensor, kh: Tensor, vh: Tensor, causal: bool, scale: float, visible: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One dense block: q [Lq, Hq, D], kh/vh [Hkv, Lk, D] (head-major) -> out [Lq, Hq, D], lse [Lq, Hq],
    by the backend of q's device (`backends.py`).

    causal means a square top-left triangle (only called with Lq == Lk); `visible` [Lq, Lk] bool, an
    explicit mask instead (a sliding window's tile; every row must see a key).
    """
    return backend_for(q.device).block(q, kh, vh, causal, scale, visible)


# Query rows per masked call of a sliding-window pair: the mask is [rows, W + rows].
WINDOW_TILE = 256


def _attend_window_pair(
    acc_out: Tensor,
    acc_lse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qr: Run,
    kr: Run,
    scale: float,
    window: int,
    fresh: bool,
) -> bool:
    """`_attend_pair` under a sliding window: key positions in (p - window, p] for a query at p."""
    qpos = qr.pos + qr.stride * torch.arange(qr.length)
    kpos = kr.pos + kr.stride * torch.arange(kr.length)
    first, last = kr.pos, _last_pos(kr)
    # rows whose window meets the run's span at all (a contiguous range: qpos ascends)
    lo = int(torch.searchsorted(qpos, first))  # first row with qpos >= first key
    hi = int(torch.searchsorted(qpos, last + window))  # rows with qpos - window < last key
    wrote = False
    for a in range(lo, hi, WINDOW_TILE):
        b = min(a + WINDOW_TILE, hi)
        # keys any row of the tile sees: (qpos[a] - window, qpos[b - 1]]
        ka = int(torch.searchsorted(kpos, qpos[a] - window, right=True))
        kb = int(torch.searchsorted(kpos, qpos[b - 1], right=True))
        if ka >= kb:
            continue
        d = qpos[a:b, None] - kpos[None, ka:kb]
        visible = (d >= 0) & (d < window)
        rows = slice(qr.start + a, qr.start + b)
        keys = slice(kr.start + ka, kr.start + kb)
        if not bool(visible.any(1).all()):
            # rows that see none of these keys (a strided run's rows between its keys, rare): plain
            # torch, which leaves such rows lse -inf, merged
            o, l = reference_block(
                q[rows], k[:, keys].transpose(0, 1), v[:, keys].transpose(0, 1), False, scale, mask=visible.to(q.device)
            )
            merge_into(acc_out[rows], acc_lse[rows], o, l)
        else:
            mask = None if bool(visible.all()) else visible.to(q.device)  # (built on the host, as qpos)
            o, l = _fused_lse(q[rows], k[:, keys], v[:, keys], False, scale, mask)
            _store_or_merge(acc_out, acc_lse, rows, o, l, fresh)
        wrote = True
    return wrote


def _attend_pair(
    acc_out: Tensor,
    acc_lse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qr: Run,
    kr: Run,
    causal: bool,
    scale: float,
    fresh: bool = False,
    window: int | None = None,
) -> bool:
    """Merge attention of query run `qr` over key run `kr` (k, v head-major) into the accumulators.

    `fresh`: nothing was merged into the run's rows yet, so the first block over each row is
    stored instead of merged. Returns whether any row was written."""
    if window is not None:
        return _attend_window_pair(acc_out, acc_lse, q, k, v, qr, kr, scale, window, fresh)
    qs, ks = qr.start, kr.start
    if not causal:
        rows = slice(qs, qs + qr.length)
        o, l = _fused_lse(q[rows], k[:, ks : ks + kr.length], v[:, ks : ks + kr.length], False, scale)
        _store_or_merge(acc_out, acc_lse, rows, o, l, fresh)
        return True
    m, n = qr.length, kr.length
    stride = kr.stride if m == 1 else qr.stride
    if n > 1 and m > 1 and qr.stride != kr.stride:
        _attend_masked(acc_out, acc_lse, q, k, v, qr, kr, scale)
        return True
    c = (qr.pos - kr.pos) // stride
    i0 = max(0, -c)
    n_vis = min(n, m + c)
    if i0 >= m or n_vis <= 0:
        return False  # fully masked: skipped
    d = i0 + c
    if d + 1 >= n_vis:  # every remaining query sees every visible key (a 1x1 square is visible too)
        rows = slice(qs + i0, qs + m)
        o, l = _fused_lse(q[rows], k[:, ks : ks + n_vis], v[:, ks : ks + n_vis], False, scale)
        _store_or_merge(acc_out, acc_lse, rows, o, l, fresh)
        return True
    sq = n_vis - d  # side of the causal square
    rows = slice(qs + i0, qs + i0 + sq)
    if d > 0:
        o, l = _fused_lse(q[rows], k[:, ks : ks + d], v[:, ks : ks + d], False, scale)
        _store_or_merge(acc_out, acc_lse, rows, o, l, fresh)
    o, l = _fused_lse(q[rows], k[:, ks + d : ks + n_vis], v[:, ks + d : ks + n_vis], True, scale)
    _store_or_merge(acc_out, acc_lse, rows, o, l, fresh and d == 0)  # each row sees its diagonal key
    if i0 + sq < m:  # rows below the square see all n_vis keys
        rows = slice(qs + i0 + sq, qs + m)
        o, l = _fused_lse(q[rows], k[:, ks : ks + n_vis], v[:, ks : ks + n_vis], False, scale)
        _store_or_merge(acc_out, acc_lse, rows, o, l, fresh)
    return True


def _store_or_merge(acc_out: Tensor, acc_lse: Tensor, rows: slice, o: Tensor, l: Tensor, fresh: bool) -> None:
    """Rows nothing was merged into yet take the block's result as it is (a copy, not the merge's
    five passes); the others merge it."""
    if fresh:
        acc_out[rows].copy_(o)
        acc_lse[rows].copy_(l)
    else:
        merge_into(acc_out[rows], acc_lse[rows], o, l)


def _attend_masked(
    acc_out: Tensor, acc_lse: Tensor, q: Tensor, k: Tensor, v: Tensor, qr: Run, kr: Run, scale: float
) -> None:
    """Runs of different strides (rare: mixed layouts): explicit mask, plain torch."""
    qpos = qr.pos + qr.stride * torch.arange(qr.length)
    kpos = kr.pos + kr.stride * torch.arange(kr.length)
    mask = (kpos.unsqueeze(0) <= qpos.unsqueeze(1)).to(q.device)  # [m, n]
    rows = slice(qr.start, qr.start + qr.length)
    keys = slice(kr.start, kr.start + kr.length)
    o, l = reference_block(q[rows], k[:, keys].transpose(0, 1), v[:, keys].transpose(0, 1), True, scale, mask=mask)
    merge_into(acc_out[rows], acc_lse[rows], o, l)


def new_accumulators(q: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 out [Tq, Hq, D] = 0 and lse [Tq, Hq] = -inf: "no key seen yet"."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def attend_into(
    acc_out: Tensor,
    acc_lse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_layout: TokenLayout,
    k_layout: TokenLayout,
    causal: bool = True,
    scale: float | None = None,
    fresh: bool = False,
    window: int | None = None,
) -> None:
    """Merge attention of q over one block of keys into running (out, lse) accumulators.

    k, v: [Tk, Hkv, D]. `fresh`: the accumulators hold nothing yet (lets the
    diagonal block be stored instead of merged). `window`: a sliding window (causal only).
    """
    _check_shapes(q, k, v, q_layout, k_layout)
    # The CPU flash kernel runs 3-6% faster on head-major contiguous K/V than on views of
    # token-major memory; one copy per block pays for itself many times over.
    attend_into_head_major(
        acc_out,
        acc_lse,
        q,
        k.transpose(0, 1).contiguous(),
        v.transpose(0, 1).contiguous(),
        q_layout,
        k_layout,
        causal,
        scale,
        fresh,
        window,
    )


def attend_into_head_major(
    acc_out: Tensor,
    acc_lse: Tensor,
    q: Tensor,
    kh: Tensor,
    vh: Tensor,
    q_layout: TokenLayout,
    k_layout: TokenLayout,
    causal: bool = True,
    scale: float | None = None,
    fresh: bool = False,
    window: int | None = None,
) -> None:
    """`attend_into` with K/V already head-major: kh, vh [Hkv, Tk, D] (as the ring ships them)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    same = causal and q_layout is k_layout and window is None
    for seq, q_runs in q_layout.by_seq.items():
        span = q_layout.ascending_span(seq) if same else None
        if span is not None:
            # Queries against their own keys, rows in increasing position order: the
            # causal mask is exactly column <= row, one kernel call for all the runs.
            a, b = span
            o, l = _fused_lse(q[a:b], kh[:, a:b], vh[:, a:b], True, scale)
            _store_or_merge(acc_out, acc_lse, slice(a, b), o, l, fresh)  # every row sees at least itself
            continue
        k_runs = k_layout.by_seq.get(seq, ())
        for qr in q_runs:
            _attend_run(acc_out, acc_lse, q, kh, vh, qr, k_runs, causal, scale, fresh, window)


def _attend_run(
    acc_out: Tensor,
    acc_lse: Tensor,
    q: Tensor,
    kh: Tensor,
    vh: Tensor,
    qr: Run,
    k_runs: list[Run],
    causal: bool,
    scale: float,
    fresh: bool = False,
    window: int | None = None,
) -> None:
    """Merge attention of query run `qr` over `k_runs` into the accumulators (`fresh`: nothing
    was merged into the run's rows yet).

    Key runs that lie next to each other in K/V and that every query of the run sees whole (all
    of them when not causal; else those ending at or before the run's first position) go to the
    kernel as one block: a chunk over a long prefix, or a ring block of many zigzag units, is one
    call per query run instead of one per pair of runs.
    """
    i, n = 0, len(k_runs)
    oldest = -1 if window is None else _last_pos(qr) - window  # keys at or before it: outside some row's window
    while i < n:
        j = i
        while j < n and (not causal or (_last_pos(k_runs[j]) <= qr.pos and k_runs[j].pos > oldest)):
            if j > i and k_runs[j].start != k_runs[j - 1].start + k_runs[j - 1].length:
                break
            j += 1
        if j - i >= 2:
            a, b = k_runs[i].start, k_runs[j - 1].start + k_runs[j - 1].length
            rows = slice(qr.start, qr.start + qr.length)
            o, l = _fused_lse(q[rows], kh[:, a:b], vh[:, a:b], False, scale)
            _store_or_merge(acc_out, acc_lse, rows, o, l, fresh)
            fresh, i = False, j
        else:
            wrote = _attend_pair(acc_out, acc_lse, q, kh, vh, qr, k_runs[i], causal, scale, fresh, window)
            fresh = fresh and not wrote  # after the first pair that wrote, every later one merges
            i += 1


def _last_pos(r: Run) -> int:
    return r.pos + (r.length - 1) * r.stride


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_layout: TokenLayout,
    k_layout: TokenLayout,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention of each query over the keys of its own sequence (`window`: only the keys at
    positions (p - window, p] from a query at p).

    Returns out [Tq, Hq, D] in q's dtype and lse [Tq, Hq] fp32.
    """
    acc_out, acc_lse = new_accumulators(q)
    attend_into(acc_out, acc_lse, q, k, v, q_layout, k_layout, causal, scale, fresh=True, window=window)
    return acc_out.to(q.dtype), acc_lse


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, q_layout: TokenLayout, k_layout: TokenLayout) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q has {q.shape[1]} heads of dim {q.shape[-1]} and k has {k.shape[1]} heads of dim {k.shape[-1]}: "
            "head dims must match and q heads must be a multiple of kv heads (GQA)"
        )
    if len(q_layout) != q.shape[0] or len(k_layout) != k.shape[0]:
        raise ValueError(
            f"layouts describe {len(q_layout)} queries / {len(k_layout)} keys; tensors hold {q.shape[0]} / {k.shape[0]}"
        )


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_layout: TokenLayout,
    k_layout: TokenLayout,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The plain-torch definition every path is tested against: one dense masked softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = q_layout.seq_ids.unsqueeze(1) == k_layout.seq_ids.unsqueeze(0)  # [Tq, Tk]
    if causal:
        mask &= k_layout.positions.unsqueeze(0) <= q_layout.positions.unsqueeze(1)
    if window is not None:
        mask &= k_layout.positions.unsqueeze(0) > q_layout.positions.unsqueeze(1) - window
    return reference_block(q, k, v, False, scale, mask=mask.to(q.device))
