"""Attention backends: what each device runs for attention, in one table (as SGLang's
`layers/attention/` backends: torch-native, triton, flashinfer). The kernels find a dense block's
backend by its tensors' device (`backend_for`: a lookup, no branches in any device's code); an
engine's rank takes its backend once at start-up (`choose`: `attention_backend`, "auto" the
device's own), for its blocks, its decode rows and its decode steps.

- `cpu` (cpu): blocks by PyTorch's CPU flash op, GQA folded into rows, a window's tiles under an
  additive mask (`cpu_flash.py`); decode rows in length buckets of slot views (`decode.DecodeBatch`);
  decode steps eager (long steps' per-token work compiled: `model/compiled.py`).
- `triton` (cuda): blocks by flash SDPA (half types, GQA native) or the memory-efficient kernel (fp32),
  a window's masked tiles in plain torch (`gpu/flash.py`); decode rows by the split-KV Triton kernel
  through the block table (`gpu/paged.py`, `gpu/triton_decode.py`); decode steps as CUDA graphs per
  batch bucket at SP 1 (`engine/decode_graph.py`).
- `torch` (cpu, cuda, and any other device's default): blocks in plain torch, fp32 (`reference.py`:
  the whole score matrix of a block, for checking, not speed); decode rows by the paged kernel's
  torch twin; decode steps over static buffers at SP 1 (eager on CPU: how CI runs the GPU's decode
  bookkeeping inside the engine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from seqpar.kernels.cpu_flash import cpu_block
from seqpar.kernels.gpu.flash import cuda_block
from seqpar.kernels.reference import reference_head_major

# q [Lq, Hq, D], kh/vh [Hkv, Lk, D], causal, scale, visible [Lq, Lk] | None -> out [Lq, Hq, D], lse [Lq, Hq] fp32
BlockFn = Callable[[Tensor, Tensor, Tensor, bool, float, "Tensor | None"], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    block: BlockFn  # one dense block with LSE: causal is a square top-left triangle, `visible` a mask
    paged_decode: bool  # decode rows read the cache through a block table (else length buckets of slot views)
    triton_decode: bool  # the paged decode kernel is Triton's (where Triton runs), else its torch twin
    static_decode: bool  # decode-only steps at SP 1 over static buffers (`engine/decode_graph.py`), captured on cuda
    devices: tuple[str, ...]  # where it runs


CPU = AttentionBackend("cpu", cpu_block, paged_decode=False, triton_decode=False, static_decode=False, devices=("cpu",))
TRITON = AttentionBackend(
    "triton", cuda_block, paged_decode=True, triton_decode=True, static_decode=True, devices=("cuda",)
)
TORCH = AttentionBackend(
    "torch", reference_head_major, paged_decode=True, triton_decode=False, static_decode=True, devices=("cpu", "cuda")
)
NAMES = {b.name: b for b in (CPU, TRITON, TORCH)}
# each device's own backend; a rank may choose another for its device once, at start-up (`choose`)
_BY_DEVICE = {"cpu": CPU, "cuda": TRITON}


def backend_for(device: torch.device | str) -> AttentionBackend:
    """The backend of a device: the one chosen for it, else its own, else plain torch."""
    return _BY_DEVICE.get(device.type if isinstance(device, torch.device) else torch.device(device).type, TORCH)


def named(name: str, device: str) -> AttentionBackend:
    """The backend `name` ("auto": the device's own) for `device`, or a ValueError naming what runs there."""
    if name == "auto":
        return backend_for(device)
    backend = NAMES.get(name)
    if backend is None or device not in backend.devices:
        here = ", ".join(["auto"] + [b.name for b in NAMES.values() if device in b.devices])
        raise ValueError(f"attention_backend={name!r} does not run on device={device!r}; choose one of {here}")
    return backend


def choose(name: str, device: str) -> AttentionBackend:
    """Make `named(name, device)` this process's backend for the device (a rank, once at start-up)."""
    backend = named(name, device)
    _BY_DEVICE[device] = backend
    return backend
