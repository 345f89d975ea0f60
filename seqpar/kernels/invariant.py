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
  every row count from 2 (a lone row still differs for some shapes, e.g. 1,536 x 576). Not so
  with torch 2.11 (oneDNN 3.10) on an Intel Xeon with AMX: an fp32 call of 1-15 rows over a
  plain weight gave its rows other bits, while packed weights agreed at every count; so `linear`
  packs a plain weight before its calls (the engine packs its weights once, at set-up).
- On an Intel Xeon with AMX (bf16), oneDNN picks its kernel by the row count: calls of 33 to ~400
  rows give a row other bits than calls of up to 32 (576 x 1,536 and the other SmolLM2 shapes),
  and no two of 32-, 64-, 128- and 256-row calls agree; but every call of exactly `TILE_ROWS`
  rows gives a row the same bits wherever it sits among them (fp32 agrees at every count there).
- AMD EPYC Zen 4 (family 25 model 17, avx512_bf16, no AMX): bf16 agrees at every count from 1 to
  1,100 rows, fp32 from 2 (SmolLM2's shapes and 576 x 4,096, plain and packed, 1 and 2 threads).
So which calls `linear` makes is probed on this CPU, per dtype (`call_rows`, once per CPU model,
cached on disk): where calls of any row count agree, one call of up to `MAX_CALL_ROWS` rows (a
lone row padded to `MIN_CALL_ROWS`); where they do not (AMX), calls of exactly `TILE_ROWS` rows,
the last one padded, which hold on every machine tried. A row's bits then come from calls that
agree, always. (At 1,024 rows 32-row tiles cost ~1.5x one call on AMX, and a decode row padded to
32 what a lone one does there; on a CPU without AMX a 32-row call costs a decode row several
times a lone one's time, so it pays to probe.) Where oneDNN does not run (fp16 here, or a build
without it) it falls back to MKL with fewer than `MIN_ROWS` rows padded to `MIN_ROWS`.
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

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from seqpar.kernels.packed import ONEDNN, pack, packed_linear  # noqa: F401 (pack: what `linear` reads fastest)
from seqpar.kernels.precision import per_cpu

# Rows below which MKL's fp32 GEMM may take another path (< 12); padded up to this many.
MIN_ROWS = 16
# Rows of every oneDNN call `linear` makes where the kernel changes with the row count (a
# multiple of AMX's 16-row tiles).
TILE_ROWS = 32
# Elsewhere: calls of at most this many rows (the model's row tile, seqpar.model.llama.ROW_TILE,
# so a prefill's calls are one per tile), at least this many (a lone row is a GEMV: other bits).
MAX_CALL_ROWS = 1024
MIN_CALL_ROWS = 2
# Columns per vocabulary tile: slices of whole tiles are as wide as one GEMM needs to agree.
VOCAB_TILE = 1024
# What `call_rows` probes: narrow (the tiny test models') and SmolLM2's MLP shapes, [k, n].
PROBE_SHAPES = ((48, 80), (576, 1536), (1536, 576))
PROBE_ROWS = (1, 2, 3, 5, 9, 12, 16, 17, 33, 64, 100, 257, 400, MAX_CALL_ROWS)
_call_rows: dict[torch.dtype, int] = {}


def _onednn(dtype: torch.dtype) -> bool:
    return ONEDNN and dtype in (torch.float32, torch.bfloat16)  # fp16 needs AVX512-FP16


def call_rows(dtype: torch.dtype) -> int:
    """Rows of each oneDNN call `linear` makes in `dtype` on this CPU: `TILE_ROWS` where a row's
    bits change with the call's row count, else 0 (calls of any count agree). Probed on
    `PROBE_SHAPES` at one thread and at the caller's count (~0.2-2 s), once per CPU model; the
    engine asks at model set-up, at the rank's thread count (`make_row_invariant`)."""
    if dtype not in _call_rows:  # one answer per process: every call of a dtype alike

        def probe() -> float:
            agree = all(rows_are_invariant(k, n, dtype, PROBE_ROWS, 0, packed_only=True) for k, n in PROBE_SHAPES)
            return 0 if agree else TILE_ROWS

        threads = torch.get_num_threads()
        _call_rows[dtype] = int(per_cpu(f"invariant call rows, {dtype}, 1 and {threads} threads", probe))
    return _call_rows[dtype]


def _onednn_calls(x: Tensor, weight: Tensor, bias: Tensor | None, tile: int) -> Tensor:
    """x @ weight.T in oneDNN calls of exactly `tile` rows, the last padded (tile 0: calls of
    `MAX_CALL_ROWS` rows and the rest, padded to at least `MIN_CALL_ROWS`); full calls read x in
    place."""
    m = x.shape[0]
    size = tile or MAX_CALL_ROWS
    whole = m - m % size
    x = x.contiguous()
    if not weight.is_mkldnn:  # a plain weight: oneDNN's own layout, as the probe measured (module docstring)
        weight = pack(weight)
    outs = [packed_linear(x[a : a + size], weight, bias) for a in range(0, whole, size)]
    rest = m - whole
    if rest or not m:  # no rows: one padded call, sliced away
        fill = tile or max(rest, MIN_CALL_ROWS)
        if fill == rest:
            outs.append(packed_linear(x[whole:], weight, bias))
        else:
            last = x.new_zeros(fill, x.shape[1])
            last[:rest] = x[whole:]
            outs.append(packed_linear(last, weight, bias)[:rest])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, tile: int | None = None) -> Tensor:
    """F.linear whose every row is the same whatever the rows around it: x [M, K] -> [M, N];
    `weight` plain or from `pack`; `tile`: rows per oneDNN call (None: `call_rows`' choice)."""
    m = x.shape[0]
    if not weight.shape[0]:  # an empty vocabulary slice
        return x.new_zeros(m, 0)
    if _onednn(x.dtype):
        return _onednn_calls(x, weight, bias, call_rows(x.dtype) if tile is None else tile)
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


def gelu_tanh_(h: Tensor) -> Tensor:
    """GELU with the tanh approximation in place, from the same ops as `silu_`:
    0.5 h (1 + tanh(y)) = h / (1 + exp(-2 y)), y = sqrt(2 / pi) (h + 0.044715 h^3). fp32 for half types."""
    x = h if h.dtype == torch.float32 else h.float()
    den = (x * x).mul_(x).mul_(0.044715).add_(x).mul_(-2.0 * math.sqrt(2.0 / math.pi)).exp_().add_(1.0)
    if h.dtype == torch.float32:
        return h.div_(den)
    return h.copy_(x.div(den))


def activation_(act: str):
    """The row-invariant in-place form of an MLP's activation (a config's `hidden_act`)."""
    if act == "silu":
        return silu_
    if act == "gelu_pytorch_tanh":
        return gelu_tanh_
    raise ValueError(
        f"no row-invariant form of the activation {act!r} (deterministic inference knows silu, gelu_pytorch_tanh)"
    )


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
    k: int,
    n: int,
    dtype: torch.dtype,
    rows: tuple[int, ...] = (1, 2, 3, 5, 9, 12, 16, 17, 33, 64, 100, 257, 400),
    tile: int | None = None,
    packed_only: bool = False,
) -> bool:
    """Whether `linear` (its calls of `tile` rows; None: `call_rows`' choice) gives every row the
    same bits at these row counts, near the start and at the end of the rows, on one thread and
    on the caller's, with the weight plain or packed (shape [*, k] @ [k, n])."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(max(rows) + 7, k, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            for weight in (pack(w),) if packed_only else (w, pack(w)):
                full = linear(x, weight, tile=tile)
                for m in rows:
                    for at in {3, x.shape[0] - m}:
                        if not torch.equal(linear(x[at : at + m], weight, tile=tile), full[at : at + m]):
                            return False
    finally:
        torch.set_num_threads(threads)
    return True
