"""Row-invariant linear algebra: a row's bits depend on the row alone, not on how many rows
are computed with it, where it sits among them, or how many threads run.

What varies, measured on this machine (torch 2.13 with MKL 2024.2 and oneDNN 3.12, AMD EPYC
Zen 5, fp32 and bf16, 1 and 2 threads):
- MKL's fp32 GEMM (what F.linear runs for fp32) takes another path for a few rows: row i of
  `X[:m] @ W` differs from row i of `X @ W` for m in 1-3 on one thread, and also 5-7, 9-11 on two
  (a thread's share of 1-3 rows). bf16's F.linear runs oneDNN.
- oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, fp32 and bf16) gives a row the same bits
  at every row count from 2 (checked 2-19 and up to 1,100 rows, at offsets 0, 7, 100, bias or
  not, 1 or 2 threads, every linear shape of SmolLM2-135M and of the tiny test models); only a
  single row differs (a GEMV). A slice of W's rows gives the same columns as the whole W unless
  it is one column wide. It is also the faster fp32 GEMM here (4,096 x 576 x 1,536 on 2 threads:
  ~45 ms against MKL's ~83 ms).
  Weights packed once in oneDNN's blocked layout (`pack`) give the same bits as plain ones, at
  every row count from 2 (a lone row still differs for some shapes, e.g. 1,536 x 576).
- On an Intel Xeon with AMX (bf16), oneDNN picks its kernel by the row count: calls of 33 to ~400
  rows give a row other bits than calls of up to 32 (576 x 1,536 and the other SmolLM2 shapes),
  and no two of 32-, 64-, 128- and 256-row calls agree; but every call of exactly `TILE_ROWS`
  rows gives a row the same bits wherever it sits among them (fp32 agrees at every count there).
So `linear` runs oneDNN on row tiles of exactly `TILE_ROWS` rows, the last one padded, which holds
on both machines: a row's bits come from a call of one shape, always. (At 1,024 rows the tiles
cost ~1.5x one call there; a decode row padded to 32 costs about what a lone one does.) Where
oneDNN does not run (fp16 here, or a build without it) it falls back to MKL with fewer than
`MIN_ROWS` rows padded to `MIN_ROWS`.
`vocab_slices` cuts a vocabulary in whole `VOCAB_TILE` columns (what MKL needs; oneDNN needs
two), or not at all when smaller.
`rows_are_invariant` probes the property for a shape; tests run it on the model's shapes.
`row_dots` (each row against its own weight rows: the head's fp32 refinement) is a multiply and a
sum, each output reduced alone (measured: the same bits for 1-133 rows, K 48-2,048, 1 and 2
threads).

Elementwise ops are lane-independent, except that PyTorch runs the last < 2 vectors of a loop
(and of each thread's chunk) through scalar code, which for some ops rounds differently from the
vector code: measured fp32 silu, sigmoid and logaddexp, bf16 rsqrt (exp, log, sin, cos, add, mul,
div, addcmul agree). `silu_` is therefore composed of ops that agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqpar.kernels.packed import ONEDNN, pack, packed_linear  # noqa: F401 (pack: what `linear` reads fastest)

# Rows below which MKL's fp32 GEMM may take another path (< 12); padded up to this many.
MIN_ROWS = 16
# Rows of every oneDNN call `linear` makes (a multiple of AMX's 16-row tiles).
TILE_ROWS = 32
# Columns per vocabulary tile: slices of whole tiles are as wide as one GEMM needs to agree.
VOCAB_TILE = 1024


def _onednn(dtype: torch.dtype) -> bool:
    return ONEDNN and dtype in (torch.float32, torch.bfloat16)  # fp16 needs AVX512-FP16


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear whose every row is the same whatever the rows around it: x [M, K] -> [M, N];
    `weight` plain or from `pack`."""
    m = x.shape[0]
    if not weight.shape[0]:  # an empty vocabulary slice
        return x.new_zeros(m, 0)
    if _onednn(x.dtype):
        whole = m - m % TILE_ROWS
        x = x.contiguous()
        # full tiles read x in place; plain weights too
        tiles = [packed_linear(x[a : a + TILE_ROWS], weight, bias) for a in range(0, whole, TILE_ROWS)]
        if whole < m or not m:  # the last rows padded to a tile (no rows: one tile, sliced away)
            last = x.new_zeros(TILE_ROWS, x.shape[1])
            last[: m - whole] = x[whole:]
            tiles.append(packed_linear(last, weight, bias)[: m - whole])
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles)
    if m < MIN_ROWS:
        padded = x.new_zeros(MIN_ROWS, x.shape[1])
        padded[:m] = x
        return F.linear(padded, weight, bias)[:m]
    return F.linear(x, weight, bias)


def silu_(h: Tensor) -> Tensor:
    """silu(h) = h / (1 + exp(-h)) in place, from ops whose vector and scalar code agree
    (torch's own silu rounds its loop tail differently). Computed in fp32 for half types."""
    if h.dtype == torch.float32:
        den = torch.neg(h).exp_().add_(1.0)
        return h.div_(den)
    h32 = h.float()
    den = torch.neg(h32).exp_().add_(1.0)
    return h.copy_(h32.div_(den))


def row_dots(x: Tensor, w: Tensor) -> Tensor:
    """x [N, K], w [N, k, K] -> [N, k]: each of a row's k dot products with its own k weight rows,
    in x's dtype. A multiply then a sum over K, each output reduced alone in one order set by K:
    what a batched GEMM (einsum) gives depends on the batch and the threads."""
    return (x[:, None, :] * w).sum(-1)


def vocab_slices(vocab: int, world: int) -> list[slice]:
    """Each rank's columns of a vocab-parallel head, in whole VOCAB_TILE tiles (the last rank
    takes the remainder; a vocabulary of one tile stays whole on rank 0)."""
    tiles = max(1, vocab // VOCAB_TILE)
    bounds = [min(vocab, -(-r * tiles // world) * VOCAB_TILE) for r in range(world)] + [vocab]
    return [slice(bounds[r], bounds[r + 1]) for r in range(world)]


def rows_are_invariant(
    k: int, n: int, dtype: torch.dtype, rows: tuple[int, ...] = (1, 2, 3, 5, 9, 12, 16, 17, 33, 64, 100)
) -> bool:
    """Whether `linear` gives every row the same bits at these row counts, on one thread and on
    the caller's, with the weight plain or packed (shape [*, k] @ [k, n])."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(max(rows) + 7, k, generator=gen).to(dtype)
    full = linear(x, w)
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            for weight in (w, pack(w)):
                if not all(torch.equal(linear(x[3 : 3 + m], weight), full[3 : 3 + m]) for m in rows):
                    return False
    finally:
        torch.set_num_threads(threads)
    return True
