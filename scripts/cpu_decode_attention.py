"""Decode attention on CPU: PyTorch-reachable candidates against the memory's rate (issue 26).

    python scripts/cpu_decode_attention.py [bf16|fp32]

One layer of SmolLM2's heads (9 query / 3 KV heads, head_dim 64), keys in a paged cache of
16-slot blocks scattered over the storage ([Hkv, slots, D], as `engine/kv_cache.py` holds it), 30
layers' storages cycled so the K/V come from memory, not the cache, 2 threads. Figures: ms per
layer and the useful bytes (the rows' K and V) over that time. Candidates:
- `flash`: what the engine runs (`kernels/decode.DecodeBatch`): the rows' keys gathered per length
  bucket into a padded block, PyTorch's CPU flash kernel over it, the KV head's query heads as rows;
- `inplace_c`: the softmax written as reductions over the block table (`K[table]` inside the sums,
  never materialized), compiled by inductor (C++ loops that load the pages in place), static shapes;
- `bmm_c` / `bmm_dyn`: the pages gathered and `bmm`s, compiled by inductor with static / dynamic
  shapes (an engine's step widths vary: static shapes mean a compile per shape).
`copy`: the rows' K bytes of each layer copied into one buffer (as many bytes read and written as
the attention reads), for the memory's rate.
"""

from __future__ import annotations

import sys
import time

import torch

from seqpar.kernels.decode import DecodeBatch
from seqpar.kernels.gpu.paged import paged_decode_torch

HQ, HKV, D, BS, LAYERS = 9, 3, 64, 16, 30
SHAPES = [(1, 1024), (1, 4096), (16, 1024), (4, 4096)]


def inplace(q, kst, vst, table, lens, scale: float):
    b, hq, d = q.shape
    hkv, g, p = kst.shape[0], hq // kst.shape[0], table.shape[1]
    kb, vb = kst.view(hkv, -1, BS, d)[:, table], vst.view(hkv, -1, BS, d)[:, table]  # [Hkv, B, P, BS, D]
    qg = q.view(b, hkv, g, d).transpose(0, 1).float() * scale
    s = (qg[:, :, :, None, None, :] * kb[:, :, None].float()).sum(-1)  # [Hkv, B, g, P, BS]
    pos = torch.arange(p * BS).view(p, BS)
    s = s.masked_fill(pos >= lens.view(1, b, 1, 1, 1), float("-inf"))
    m = s.amax(dim=(-1, -2), keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    e = torch.exp(s - m)
    den = e.sum(dim=(-1, -2))
    out = (e[..., None] * vb[:, :, None].float()).sum(dim=(3, 4)) / den[..., None]
    lse = m[..., 0, 0] + den.log()
    return out.transpose(0, 1).reshape(b, hq, d), lse.transpose(0, 1).reshape(b, hq)


def bmm(q, kst, vst, table, lens, scale: float):
    b, hq, d = q.shape
    hkv, g, p = kst.shape[0], hq // kst.shape[0], table.shape[1]
    kb = kst.view(hkv, -1, BS, d)[:, table].reshape(hkv * b, p * BS, d)
    vb = vst.view(hkv, -1, BS, d)[:, table].reshape(hkv * b, p * BS, d)
    qg = (q.view(b, hkv, g, d).transpose(0, 1) * scale).reshape(hkv * b, g, d)
    s = torch.bmm(qg, kb.transpose(1, 2)).float().view(hkv, b, g, p * BS)
    s = s.masked_fill(torch.arange(p * BS) >= lens.view(1, b, 1, 1), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    e = torch.exp(s - m)
    den = e.sum(-1)
    out = torch.bmm(e.to(vb.dtype).view(hkv * b, g, p * BS), vb).float().view(hkv, b, g, d) / den[..., None]
    lse = m[..., 0] + den.log()
    return out.transpose(0, 1).reshape(b, hq, d), lse.transpose(0, 1).reshape(b, hq)


def measure(b: int, length: int, dtype: torch.dtype, gen: torch.Generator, dyn) -> dict[str, float]:
    """Best seconds per layer of each candidate over `b` rows of `length` keys; checks each one's result."""
    pages = -(-length // BS)
    nb = b * pages + 8
    table = torch.randperm(nb, generator=gen)[: b * pages].view(b, pages).to(torch.int32)
    stores = [tuple(torch.randn(HKV, nb * BS, D, generator=gen).to(dtype) for _ in "kv") for _ in range(LAYERS)]
    q = torch.randn(b, HQ, D, generator=gen).to(dtype)
    lens = torch.full((b,), length, dtype=torch.int32)
    lens[0] -= 5  # one ragged row
    scale = D**-0.5
    slots = [(table[r].long()[:, None] * BS + torch.arange(BS)).flatten()[: int(lens[r])] for r in range(b)]
    batch = DecodeBatch(slots)  # built once per step in the engine, as the block table is
    static_inplace = torch.compile(inplace, dynamic=False)
    static_bmm = torch.compile(bmm, dynamic=False)
    dst = torch.empty(HKV, int(lens.sum()), D, dtype=dtype)
    runs = {
        "flash": lambda k, v: batch.attend(q, k, v, scale),
        "inplace_c": lambda k, v: static_inplace(q, k, v, table, lens, scale),
        "bmm_c": lambda k, v: static_bmm(q, k, v, table, lens, scale),
        "bmm_dyn": lambda k, v: dyn(q, k, v, table, lens, scale),
        "copy": lambda k, v: dst.copy_(k[:, : dst.shape[1]]),
    }
    best: dict[str, float] = {}
    with torch.inference_mode():
        want = paged_decode_torch(q, *stores[0], table, lens, BS, scale)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, run in runs.items():
            if name != "copy":  # each candidate is the same attention
                got = run(*stores[0])
                torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        for _ in range(3):  # interleaved rounds, best of each
            for name, run in runs.items():
                t0 = time.perf_counter()
                for k, v in stores:
                    run(k, v)
                t = (time.perf_counter() - t0) / LAYERS
                best[name] = min(best.get(name, t), t)
    return best


def main() -> None:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1] if len(sys.argv) > 1 else "bf16"]
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    dyn = torch.compile(bmm, dynamic=True)
    names = ("flash", "inplace_c", "bmm_c", "bmm_dyn", "copy")
    print(f"{dtype}, {torch.get_num_threads()} threads; ms per layer (GB/s of the rows' K and V)")
    print("| rows x keys | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for b, length in SHAPES:
        best = measure(b, length, dtype, gen, dyn)
        nbytes = 2 * HKV * (b * length - 5) * D * dtype.itemsize
        cells = [f"{best[n] * 1e3:.3f} ({nbytes / best[n] / 1e9:.1f})" for n in names]
        print(f"| {b} x {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
