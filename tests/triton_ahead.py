"""Compiles seqpar's Triton kernels for real GPUs, on a machine without one.

Triton's interpreter (how CI runs the kernels, tests/test_paged_decode.py) checks what they compute,
not whether they compile: it takes block shapes, dtypes and dots that the GPU compiler refuses, and
never counts shared memory. Triton's wheel carries its LLVM and NVIDIA's ptxas, so a kernel compiles
down to a cubin for a named GPU with no GPU at hand. Here every launch `triton_decode.plan` makes
for a model's shapes is compiled as Triton's launcher would specialise it (its arguments' types,
ints equal to 1 as constants, 16-aligned pointers and ints marked so).

Run by tests/test_triton_compiles.py in a process of its own: the interpreter, on in the tests'
process, replaces what compiling needs. Prints one JSON line per compiled launch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile

import torch
from triton import compile as triton_compile
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from seqpar.kernels.gpu.triton_decode import Launch, plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def source(launch: Launch) -> ASTSource:
    """The launch as Triton's JIT would hand it to the compiler."""
    fn = launch.kernel
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        kind, attr = native_specialize_impl(CUDABackend, launch.args[i], False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # an int equal to 1
            constexprs[name] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return ASTSource(fn, signature, constexprs, attrs)


def launches(head_dim: int, hq: int, hkv: int, dtype: str, splits: int, window: bool) -> list[Launch]:
    """A decode step's launches for one layer: 3 rows over 5 pages of 16 slots each."""
    rows, page, pages = 3, 16, 5
    dt = DTYPES[dtype]
    q = torch.zeros(rows, hq, head_dim, dtype=dt)
    k = torch.zeros(hkv, pages * page + 1, head_dim, dtype=dt)  # (+1: a static step's scratch slot)
    table = torch.zeros(rows, pages, dtype=torch.int32)
    lens = torch.full((rows,), pages * page, dtype=torch.int32)
    starts = torch.zeros(rows, dtype=torch.int32) if window else None
    return plan(q, k, torch.zeros_like(k), table, lens, page, head_dim**-0.5, splits, starts=starts, on_gpu=True)[2]


def resources(cubin: bytes) -> dict[str, int]:
    """Registers a thread uses and its stack frame (bytes: registers spilled to local memory, 0 without
    spills), as NVIDIA's cuobjdump (in Triton's wheel) reads them from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK):(\d+)", usage)}


def main(cases: list[dict]) -> None:
    """Each case: `launches`' arguments and "archs", the compute capabilities (90: sm_90) to compile for."""
    for case in cases:
        archs = case.pop("archs")
        for launch in launches(**case):
            for arch in archs:
                kernel = triton_compile(source(launch), target=GPUTarget("cuda", arch, 32))
                print(json.dumps({
                    **case, "kernel": launch.kernel.fn.__name__, "arch": arch, "shared": kernel.metadata.shared,
                    **resources(kernel.asm["cubin"]),
                    # loads issued ahead by Triton's software pipelining (cp.async), in its GPU IR
                    "async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local"),
                }))  # fmt: skip


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
