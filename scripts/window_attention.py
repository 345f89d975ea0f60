"""Prefill attention of a sliding-window layer against a global one (issue 27), one prompt on CPU.

    python scripts/window_attention.py [bf16|fp32] [LENGTHS]   # default bf16 8192,16384,32768

One layer of Gemma 3 1B's attention (4 query / 1 KV head, head_dim 256, window 512), one prompt
attending to itself through `attention_with_lse` (the kernel every engine strategy runs), 2 threads,
random q/k/v. A window layer's work grows as T x W, a global one's as T^2 / 2: the script prints the
seconds of each, their ratio, and each one's growth from the previous length. The window result is
checked against the dense reference on the first 2,048 rows' 2,048 keys (the reference is [T, T]).
"""

from __future__ import annotations

import sys
import time

import torch

from seqpar.kernels.attention import attention_with_lse, reference_attention
from seqpar.kernels.layout import Run, TokenLayout

HQ, HKV, D, WINDOW = 4, 1, 256, 512


def seconds(reps: int, *args) -> float:
    """Best of `reps` calls of attention_with_lse(*args), after one not kept."""
    attention_with_lse(*args)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        attention_with_lse(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    dtype = torch.float32 if len(sys.argv) > 1 and sys.argv[1] == "fp32" else torch.bfloat16
    lengths = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [8192, 16384, 32768]
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    head = f"{'T':>6} {'window s':>9} {'global s':>9} {'global/window':>14} {'window growth':>14} {'global growth':>14}"
    print(f"Gemma 3 1B attention layer, {dtype}, window {WINDOW}\n{head}")
    prev = None
    for t in lengths:
        lay = TokenLayout.from_runs([Run(0, t, 0, 0, 1)])
        q = torch.randn(t, HQ, D, generator=g).to(dtype)
        k = torch.randn(t, HKV, D, generator=g).to(dtype)
        v = torch.randn(t, HKV, D, generator=g).to(dtype)
        if prev is None:  # exact where the dense reference fits
            n = 2048
            small = TokenLayout.from_runs([Run(0, n, 0, 0, 1)])
            out, _ = attention_with_lse(q[:n], k[:n], v[:n], small, small, True, None, WINDOW)
            ref, _ = reference_attention(q[:n], k[:n], v[:n], small, small, True, None, WINDOW)
            err = (out.float() - ref.float()).abs().max().item()
            assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), err
        win = seconds(3, q, k, v, lay, lay, True, None, WINDOW)
        full = seconds(1, q, k, v, lay, lay, True)
        grow = ("", "") if prev is None else (f"{win / prev[0]:.2f}x", f"{full / prev[1]:.2f}x")
        print(f"{t:>6} {win:>9.3f} {full:>9.3f} {full / win:>14.1f} {grow[0]:>14} {grow[1]:>14}", flush=True)
        prev = (win, full)


if __name__ == "__main__":
    main()
