"""Row-invariant linear algebra: a row's bits depend on the row alone, not on how many rows
are computed with it, where it sits among them, or how many threads run.

What varies, measured on this machine's BLAS (torch 2.13, AMD EPYC, fp32 and bf16, 1 and 2
threads): an fp32 GEMM with fewer than 12 rows (but 4 and 8) takes another path (GEMV-like), so
row i of `X[:m] @ W` differs from row i of `X @ W` for m in 1-3, 5-7, 9-11. From 12 rows up, every
row, at any offset, agrees with every other row count (checked up to 4,096 rows, bias or not,
1 or 2 threads, every linear shape of SmolLM2-135M and of the tiny test models). Columns behave
alike: a slice of W's rows gives the same columns as the whole W once it is >= 1,024 columns wide
(narrow slices of a tiny vocabulary do not). So:
- `linear` pads fewer than `MIN_ROWS` rows with zeros (a decode step's one row becomes 16; the
  padding costs a GEMM of 16 rows instead of a GEMV, on weights read once either way);
- `vocab_slices` cuts a vocabulary in whole `VOCAB_TILE` columns (or not at all when smaller).
`rows_are_invariant` probes the property for a shape; tests run it on the model's shapes.

Elementwise ops are lane-independent, except that PyTorch runs the last < 2 vectors of a loop
(and of each thread's chunk) through scalar code, which for some ops rounds differently from the
vector code: measured fp32 silu, sigmoid and logaddexp, bf16 rsqrt (exp, log, sin, cos, add, mul,
div, addcmul agree). `silu_` is therefore composed of ops that agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows below which a GEMM may take another path (fp32: < 12); padded up to this many.
MIN_ROWS = 16
# Columns per vocabulary tile: slices of whole tiles are as wide as one GEMM needs to agree.
VOCAB_TILE = 1024


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear whose every row is the same whatever the rows around it: x [M, K] -> [M, N]."""
    m = x.shape[0]
    if m >= MIN_ROWS:
        return F.linear(x, weight, bias)
    padded = x.new_zeros(MIN_ROWS, x.shape[1])
    padded[:m] = x
    return F.linear(padded, weight, bias)[:m]


def silu_(h: Tensor) -> Tensor:
    """silu(h) = h / (1 + exp(-h)) in place, from ops whose vector and scalar code agree
    (torch's own silu rounds its loop tail differently). Computed in fp32 for half types."""
    if h.dtype == torch.float32:
        den = torch.neg(h).exp_().add_(1.0)
        return h.div_(den)
    h32 = h.float()
    den = torch.neg(h32).exp_().add_(1.0)
    return h.copy_(h32.div_(den))


def vocab_slices(vocab: int, world: int) -> list[slice]:
    """Each rank's columns of a vocab-parallel head, in whole VOCAB_TILE tiles (the last rank
    takes the remainder; a vocabulary of one tile stays whole on rank 0)."""
    tiles = max(1, vocab // VOCAB_TILE)
    bounds = [min(vocab, -(-r * tiles // world) * VOCAB_TILE) for r in range(world)] + [vocab]
    return [slice(bounds[r], bounds[r + 1]) for r in range(world)]


def rows_are_invariant(k: int, n: int, dtype: torch.dtype, rows: tuple[int, ...] = (16, 17, 33, 64, 100)) -> bool:
    """Whether `linear` gives every row the same bits at these row counts (shape [*, k] @ [k, n])."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(max(rows) + 7, k, generator=gen).to(dtype)
    full = linear(x, w)
    return all(torch.equal(linear(x[3 : 3 + m], w), full[3 : 3 + m]) for m in (1, 2, 5, *rows))
