"""Which floating type to compute in: `dtype="auto"` (vLLM's values: auto, bfloat16, float16, float32).

`auto` takes the checkpoint's dtype where this machine computes it fast and float32 where it
does not: a half type is only worth its rounding when it buys speed. A float32 checkpoint stays
float32. On CUDA the checkpoint's dtype is used as is. On a CPU the flags answer first
(`amx_bf16` / `amx_fp16`: Intel AMX tiles, bf16 GEMMs ~12x fp32); where they do not (AVX-512
with `avx512_bf16` but no AMX, for one), a GEMM of the model's shapes in the half type and in
fp32 is timed (~0.1 s), and the ratio cached per process and on disk, keyed by the CPU.

Measured, 2 threads, torch 2.13 (oneDNN 3.12), [rows x 576] @ [576 x 1536] (SmolLM2's MLP):
- AMD EPYC (Zen 5, family 26 model 2, avx512_bf16, no AMX): fp32 ~155-195 GFLOP/s, bf16
  ~820-890 (5x: oneDNN's AVX512-BF16 kernels), fp16 ~33-53 (no fp16 GEMM kernel: 0.2x).
  The CPU flash attention at S=4096 (9 q / 3 kv heads, D=64): 72 GFLOP/s in fp32 and in bf16.
  So auto picks bfloat16 for a bf16 checkpoint, float32 for a float16 one.
- Intel Xeon with AMX (2,048 x 576 x 1,536): bf16 ~2,250 GFLOP/s against ~190 in fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

HALF_TYPES = (torch.bfloat16, torch.float16)
# A CPU flag that promises fast GEMMs in each half type.
_FAST_FLAG = {torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}
# The half type must beat fp32 by this much: below it, rounding for nothing.
MIN_SPEEDUP = 1.25
# The measured GEMM: 512 rows of SmolLM2's gate projection (hidden 576 -> 1536).
_SHAPE = (512, 576, 1536)
_memo: dict[str, float] = {}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_key() -> str:
    """The CPU (model name, family, model, stepping, flags) and torch version, as a cache key."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "cpu family", "model", "stepping", "flags") and name not in fields:
                fields[name] = value.strip()
    except OSError:
        fields["machine"] = platform.machine() + " " + platform.processor()
    flags = fields.pop("flags", "")
    text = " ".join(fields.values()) + " " + hashlib.sha1(flags.encode()).hexdigest()[:8]
    return f"{text} torch {torch.__version__}"


def _gemm_seconds(dtype: torch.dtype, reps: int = 4) -> float:
    m, k, n = _SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    torch.nn.functional.linear(a, w)  # warm-up: kernel selection, first-touch
    best = float("inf")
    for _ in range(reps):  # the best of a few: another process on the cores only slows one
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t)
    return best


def _cache_file() -> Path:
    root = Path(os.environ.get("SEQPAR_CACHE_DIR") or Path.home() / ".cache" / "seqpar")
    return root / "precision.json"


def per_cpu(name: str, compute: Callable[[], float]) -> float:
    """`compute()` once per CPU model and torch version, kept under `name` in this process and in
    the cache folder (what a measurement or probe of this machine found)."""
    if name in _memo:
        return _memo[name]
    file, key = _cache_file(), cpu_key()
    try:
        table = json.loads(file.read_text())
    except (OSError, ValueError):
        table = {}
    entry = table.get(key, {})
    if name not in entry:
        entry[name] = compute()
        table[key] = entry
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(file)  # whole or not at all: ranks may measure at once
        except OSError:
            pass  # not writable: measured again next process
    _memo[name] = float(entry[name])
    return _memo[name]


def measured_speedup(dtype: torch.dtype) -> float:
    """fp32 GEMM time over `dtype` GEMM time on this CPU (>1: the half type is faster).
    Measured once per CPU model; kept in this process and in the cache folder."""
    return per_cpu(str(dtype), lambda: round(_gemm_seconds(torch.float32) / _gemm_seconds(dtype), 3))


def choose_dtype(
    checkpoint: torch.dtype,
    device: str = "cpu",
    flags: set[str] | None = None,
    speedup: Callable[[torch.dtype], float] = measured_speedup,
) -> tuple[torch.dtype, str]:
    """`auto`'s choice for a checkpoint stored in `checkpoint`: (dtype, why, in a few words)."""
    name = str(checkpoint).removeprefix("torch.")
    if checkpoint not in HALF_TYPES:
        return torch.float32, f"checkpoint {name}"
    if device != "cpu":
        return checkpoint, f"checkpoint {name} on {device}"
    flags = cpu_flags() if flags is None else flags
    if _FAST_FLAG[checkpoint] in flags:
        return checkpoint, f"checkpoint {name}, {_FAST_FLAG[checkpoint]} here"
    ratio = speedup(checkpoint)
    short = "bf16" if checkpoint == torch.bfloat16 else "fp16"
    why = f"checkpoint {name}; {short} GEMM {ratio:.1f}x fp32 here"
    return (checkpoint if ratio >= MIN_SPEEDUP else torch.float32), why
