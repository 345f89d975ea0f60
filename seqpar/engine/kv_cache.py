"""The KV cache of ONE sequence-parallel rank, and where a sequence's tokens live.

Placement is a pure function of position, so the same prompt prefix lands on the
same ranks whatever follows it (prefix caching needs that): a sequence's positions
are cut into *shard units* of `shard_blocks` whole KV blocks, and unit u goes to
rank `unit_owner(u)`: zigzag over units (period 2W: ranks 0..W-1 then W-1..0, so an
early unit pairs with a late one and causal work stays balanced) or striped
(u mod W). Decoded tokens follow the same rule.

The driver's block manager decides which physical block holds each logical block
(`blocks[i]` holds positions [i * block_size, (i + 1) * block_size) on rank
`owner(i)`); a rank only stores K/V where it is told. A slot is
`block * block_size + offset`, an index into the flat storage.

Storage is head-major, `[num_layers, Hkv, num_slots, D]`: the kernels read a run of
consecutive slots of one layer as a view `[Hkv, n, D]`, so attention reads the cache
in place instead of copying every cached token once per layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seqpar.kernels.layout import Run

SHARD_SCHEMES = ("zigzag", "striped")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens (ceil division)."""
    if num_tokens < 0 or block_size <= 0:
        raise ValueError(f"need num_tokens >= 0 and block_size > 0, got {num_tokens}, {block_size}")
    return -(-num_tokens // block_size)


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


@dataclass(frozen=True)
class Placement:
    """Which SP rank holds each logical KV block of every sequence."""

    sp_size: int
    block_size: int
    shard_blocks: int = 16
    scheme: str = "zigzag"

    def __post_init__(self) -> None:
        if self.scheme not in SHARD_SCHEMES:
            raise ValueError(
                f"scheme={self.scheme!r}: the engine shards prompts in whole KV blocks, "
                f"zigzag or striped over units; choose one of {', '.join(SHARD_SCHEMES)}"
            )

    @property
    def unit_tokens(self) -> int:
        return self.block_size * self.shard_blocks

    def owner(self, block: int) -> int:
        """SP rank of logical block `block`."""
        u, w = block // self.shard_blocks, self.sp_size
        if self.scheme == "striped":
            return u % w
        m = u % (2 * w)
        return m if m < w else 2 * w - 1 - m

    def token_runs(self, start: int, stop: int) -> list[list[tuple[int, int]]]:
        """Positions [start, stop) as (first, length) stretches, per owning rank."""
        per_rank: list[list[tuple[int, int]]] = [[] for _ in range(self.sp_size)]
        u = self.unit_tokens
        p = start
        while p < stop:
            end = min(stop, (p // u + 1) * u)
            per_rank[self.owner(p // self.block_size)].append((p, end - p))
            p = end
        return per_rank

    def blocks_per_rank(self, num_tokens: int) -> list[int]:
        """Blocks each rank needs to hold `num_tokens` positions of one sequence."""
        counts = [0] * self.sp_size
        for i in range(blocks_needed(num_tokens, self.block_size)):
            counts[self.owner(i)] += 1
        return counts

    def max_tokens(self, num_blocks: int) -> int:
        """Longest sequence whose blocks fit in `num_blocks` per rank."""
        counts = [0] * self.sp_size
        i = 0
        while True:
            r = self.owner(i)
            if counts[r] == num_blocks:
                return i * self.block_size
            counts[r] += 1
            i += 1

    def key_runs(self, blocks: list[int], num_tokens: int, seq: int) -> list[list[Run]]:
        """Per rank: the cached positions [0, num_tokens) of one sequence (batch row `seq`) as runs over
        storage slots. Neighbouring blocks that are adjacent both in position and in storage form one run."""
        per_rank: list[list[Run]] = [[] for _ in range(self.sp_size)]
        bs = self.block_size
        for i in range(blocks_needed(num_tokens, bs)):
            runs = per_rank[self.owner(i)]
            n = min(bs, num_tokens - i * bs)
            slot = blocks[i] * bs
            last = runs[-1] if runs else None
            if last is not None and last.pos + last.length == i * bs and last.start + last.length == slot:
                runs[-1] = Run(last.start, last.length + n, seq, last.pos, 1)
            else:
                runs.append(Run(slot, n, seq, i * bs, 1))
        return per_rank


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
