"""The KV cache of ONE sequence-parallel rank: its storage, and what a block of it costs.

Which rank holds which block is `placement.py`; the driver's block manager decides which
physical block holds each logical block (`blocks[i]` holds positions
[i * block_size, (i + 1) * block_size) on rank `owner(i)`); a rank only stores K/V where it
is told. A slot is `block * block_size + offset`, an index into the flat storage.

Storage is head-major, `[num_layers, Hkv, num_slots, D]`: the kernels read a run of
consecutive slots of one layer as a view `[Hkv, n, D]`, so attention reads the cache
in place instead of copying every cached token once per layer and step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
    """Bytes one block costs: K and V for every layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def size_cache(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    memory_bytes: int,
    block_size: int,
    what: str = "memory_bytes",
) -> int:
    """How many blocks fit in `memory_bytes`; `what` names the setting in the error."""
    per_block = block_bytes(num_layers, num_kv_heads, head_dim, dtype, block_size)
    num_blocks = memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"{what} gives {memory_bytes} bytes, less than one KV block ({per_block} bytes at "
            f"block_size={block_size}); give the cache more memory or use a smaller block_size"
        )
    return num_blocks


class KVCache:
    """K/V storage `[num_layers, Hkv, num_blocks * block_size, D]` of one rank; written where the driver says."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, val in [
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ]:
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {val!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"KVCache: dtype must be a floating type, got {dtype}")
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store one layer's K/V `[n, Hkv, D]` into `slots [n]` (one index_copy_ each)."""
        expect = (slots.numel(), self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expect or tuple(v.shape) != expect:
            raise ValueError(f"write: k/v must be {list(expect)} ([n, Hkv, D]), got {list(k.shape)}, {list(v.shape)}")
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1).to(self.dtype))  # [Hkv, num_slots, D]
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1).to(self.dtype))

    def storage(self, layer: int) -> tuple[Tensor, Tensor]:
        """One layer's whole K, V storage `[Hkv, num_slots, D]` (views): index it with slot runs."""
        return self.k[layer], self.v[layer]
