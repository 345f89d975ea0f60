"""Attention backends: what each device runs for attention, in one table (as SGLang's
`layers/attention/` backends: torch-native, triton, flashinfer). The kernels find a dense block's
backend by its tensors' device (`backend_for`: a lookup, no branches in any device's code); the
engine's ranks take theirs once at start-up, for decode and for graphs.

- `cpu` (cpu): blocks by PyTorch's CPU flash op, GQA folded into rows, a window's tiles under an
  additive mask (`cpu_flash.py`); decode rows in length buckets of slot views (`decode.DecodeBatch`);
  decode steps eager (long steps' per-token work compiled: `model/compiled.py`).
- `triton` (cuda): blocks by flash SDPA (half types, GQA native) or the memory-efficient kernel (fp32),
  a window's masked tiles in plain torch (`gpu/flash.py`); decode rows by the split-KV Triton kernel
  through the block table (`gpu/paged.py`, `gpu/triton_decode.py`); decode steps as CUDA graphs per
  batch bucket at SP 1 (`engine/decode_graph.py`).
- `torch` (any other device): blocks in plain torch, fp32 (`reference.py`); decode rows by the paged
  kernel's torch twin; decode steps eager.
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
    graphs: bool  # decode steps can be captured as graphs over static buffers


CPU = AttentionBackend("cpu", cpu_block, paged_decode=False, graphs=False)
TRITON = AttentionBackend("triton", cuda_block, paged_decode=True, graphs=True)
TORCH = AttentionBackend("torch", reference_head_major, paged_decode=True, graphs=False)
BACKENDS = {"cpu": CPU, "cuda": TRITON}


def backend_for(device: torch.device | str) -> AttentionBackend:
    """The backend of a device: its own where it has one, else plain torch."""
    return BACKENDS.get(device.type if isinstance(device, torch.device) else torch.device(device).type, TORCH)
