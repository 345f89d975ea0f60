"""A paged KV cache for ONE sequence-parallel rank.

Each rank holds only its share of every sequence (zigzag chunks from prefill,
round-robin tokens from decode), so a sequence's local tokens are not
contiguous in global position. Next to K/V the cache therefore stores each
token's true global position, paged with the same slots: attention needs it
for the causal mask, and it costs 8 bytes per token against kilobytes of K/V.

Vocabulary: L_local = tokens of one sequence held by this rank; a "slot" is
`block_id * block_size + offset`, an index into the flattened block storage.
Tokens of a sequence are kept in the order they were appended.

Storage is head-major, `[num_layers, Hkv, num_slots, D]`: the attention kernels
read a run of consecutive slots of one layer as a view `[Hkv, n, D]`, so decode
attends over the cache in place (`layout` gives the runs) instead of copying every
cached token once per layer and step.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from seqpar.kernels.layout import TokenLayout


class CacheFullError(RuntimeError):
    """Not enough free blocks for a reservation; the cache was left unchanged."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens (ceil division)."""
    if num_tokens < 0 or block_size <= 0:
        raise ValueError(f"need num_tokens >= 0 and block_size > 0, got {num_tokens}, {block_size}")
    return -(-num_tokens // block_size)


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
    """Bytes one block costs: K and V for every layer, plus the int64 positions."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv = 2 * num_layers * block_size * num_kv_heads * head_dim * elem
    return kv + block_size * torch.empty((), dtype=torch.int64).element_size()


def size_cache(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, memory_bytes: int, block_size: int
) -> int:
    """How many blocks fit in `memory_bytes`."""
    per_block = block_bytes(num_layers, num_kv_heads, head_dim, dtype, block_size)
    num_blocks = memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"memory_bytes={memory_bytes} is smaller than one KV block ({per_block} bytes at "
            f"block_size={block_size}); give the cache more memory or use a smaller block_size"
        )
    return num_blocks


class PagedKVCache:
    """K/V storage `[num_layers, Hkv, num_blocks * block_size, D]`, a free list and per-sequence block tables."""

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
        for name, val in [("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)]:
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {val!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"PagedKVCache: dtype must be a floating type, got {dtype}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((num_blocks * block_size,), -1, dtype=torch.int64, device=device)
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        # Slots of one sequence are rebuilt only when its length changes, so the
        # per-layer gathers of a step share one index tensor instead of L builds.
        self._slot_cache: dict[int, Tensor] = {}

    # ---- bookkeeping -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def seq_ids(self) -> list[int]:
        return list(self._tables)

    def local_len(self, seq_id: int) -> int:
        return self._lens[self._check(seq_id)]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._tables[self._check(seq_id)])

    def bytes_per_block(self) -> int:
        return block_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.block_size)

    def bytes_used(self) -> int:
        return (self.num_blocks - self.num_free_blocks) * self.bytes_per_block()

    def capacity_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block()

    def _check(self, seq_id: int) -> int:
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id} has no entry in this KV cache; reserve(seq_id, n) it first "
                           f"(n may be 0 on a rank that holds none of its tokens)")
        return seq_id

    def _extra_blocks(self, seq_id: int, num_new_tokens: int) -> int:
        have = len(self._tables.get(seq_id, ()))
        return max(0, blocks_needed(self._lens.get(seq_id, 0) + num_new_tokens, self.block_size) - have)

    # ---- allocation --------------------------------------------------------------
    def can_allocate(self, num_tokens_by_seq: dict[int, int]) -> bool:
        """Whether every sequence can get room for its count of new tokens at once."""
        return sum(self._extra_blocks(s, n) for s, n in num_tokens_by_seq.items()) <= self.num_free_blocks

    def reserve(self, seq_id: int, num_new_tokens: int) -> None:
        """Make room for `num_new_tokens` beyond the sequence's current local length.

        Registers the sequence if new. Idempotent for the same n: it guarantees room,
        it does not append. Raises CacheFullError, changing nothing, if blocks run out.
        """
        self.reserve_many({seq_id: num_new_tokens})

    def reserve_many(self, num_tokens_by_seq: dict[int, int]) -> None:
        """`reserve` for a whole batch, all or nothing."""
        if any(n < 0 for n in num_tokens_by_seq.values()):
            raise ValueError(f"reserve counts must be >= 0, got {num_tokens_by_seq}")
        need = sum(self._extra_blocks(s, n) for s, n in num_tokens_by_seq.items())
        if need > self.num_free_blocks:
            raise CacheFullError(
                f"KV cache full: reserving {num_tokens_by_seq} (seq_id: new tokens) needs {need} more blocks "
                f"but only {self.num_free_blocks} of {self.num_blocks} are free (block_size {self.block_size}); "
                f"free finished sequences first or size the cache larger"
            )
        for s, n in num_tokens_by_seq.items():
            extra = self._extra_blocks(s, n)
            table = self._tables.setdefault(s, [])
            self._lens.setdefault(s, 0)
            table.extend(self._free.popleft() for _ in range(extra))

    def free(self, seq_id: int) -> None:
        """Return all of a sequence's blocks to the free list."""
        self._free.extend(self._tables.pop(self._check(seq_id)))
        del self._lens[seq_id]
        self._slot_cache.pop(seq_id, None)

    # ---- slots -------------------------------------------------------------------
    def _slots_range(self, seq_id: int, start: int, stop: int) -> Tensor:
        idx = torch.arange(start, stop, dtype=torch.int64)
        table = torch.tensor(self._tables[seq_id], dtype=torch.int64)
        return table[idx // self.block_size] * self.block_size + idx % self.block_size

    def _seq_slots(self, seq_id: int) -> Tensor:
        n = self.local_len(seq_id)
        cached = self._slot_cache.get(seq_id)
        if cached is None or cached.numel() != n:
            cached = self._slots_range(seq_id, 0, n).to(self.positions.device)
            self._slot_cache[seq_id] = cached
        return cached

    def append_positions(self, seq_id: int, positions: Tensor | list[int]) -> Tensor:
        """Append tokens (by their global positions) to a sequence; returns their slots [n].

        Room must have been reserved. Their K/V are written afterwards by `write`.
        """
        pos = torch.as_tensor(positions, dtype=torch.int64, device=self.positions.device).reshape(-1)
        start = self.local_len(seq_id)
        if start + pos.numel() > len(self._tables[seq_id]) * self.block_size:
            raise CacheFullError(
                f"sequence {seq_id}: appending {pos.numel()} tokens to {start} exceeds its reserved room "
                f"({len(self._tables[seq_id]) * self.block_size} slots); call reserve(seq_id, n) first"
            )
        slots = self._slots_range(seq_id, start, start + pos.numel()).to(pos.device)
        self.positions[slots] = pos
        self._lens[seq_id] = start + pos.numel()
        return slots

    def slot_mapping(self, seq_ids: list[int], counts: list[int]) -> Tensor:
        """Slots of the last `counts[i]` local tokens of each `seq_ids[i]`, concatenated: [sum counts].

        Called once per step after `append_positions`; every layer reuses it in `write`.
        """
        parts = []
        for s, c in zip(seq_ids, counts, strict=True):
            n = self.local_len(s)
            if not 0 <= c <= n:
                raise ValueError(f"sequence {s}: count {c} is outside [0, local_len={n}]")
            parts.append(self._seq_slots(s)[n - c:])
        if not parts:
            return torch.empty(0, dtype=torch.int64, device=self.positions.device)
        return torch.cat(parts)

    # ---- data --------------------------------------------------------------------
    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store one layer's K/V `[n, Hkv, D]` for a packed batch into `slots [n]` (one index_copy_ each)."""
        expect = (slots.numel(), self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expect or tuple(v.shape) != expect:
            raise ValueError(f"write: k/v must be {list(expect)} ([n, Hkv, D]), got {list(k.shape)}, {list(v.shape)}")
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1).to(self.dtype))  # [Hkv, num_slots, D]
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1).to(self.dtype))

    def gather(self, layer: int, seq_id: int) -> tuple[Tensor, Tensor, Tensor]:
        """One sequence's local K, V `[L_local, Hkv, D]` and positions `[L_local]`, in append order."""
        slots = self._seq_slots(seq_id)
        k, v = self.read(layer, slots)
        return k, v, self.positions.index_select(0, slots)

    def batch_slots(self, seq_ids: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Slots, seq_index (row in seq_ids) and positions of every cached token of these
        sequences: computed once per decode step, then `read` per layer."""
        per_seq = [self._seq_slots(s) for s in seq_ids]
        dev = self.positions.device
        slots = torch.cat(per_seq) if per_seq else torch.empty(0, dtype=torch.int64, device=dev)
        lens = torch.tensor([p.numel() for p in per_seq], dtype=torch.int64, device=dev)
        seq_index = torch.repeat_interleave(torch.arange(len(seq_ids), device=dev), lens)
        return slots, seq_index, self.positions.index_select(0, slots)

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """K, V `[n, Hkv, D]` at `slots [n]` of one layer (copies)."""
        def pick(store: Tensor) -> Tensor:
            return store[layer].index_select(1, slots).transpose(0, 1).contiguous()
        return pick(self.k), pick(self.v)

    def storage(self, layer: int) -> tuple[Tensor, Tensor]:
        """One layer's whole K, V storage `[Hkv, num_slots, D]` (views): index it with `layout`'s runs."""
        return self.k[layer], self.v[layer]

    def layout(self, seq_ids: list[int]) -> TokenLayout:
        """Every cached token of these sequences as runs over storage slots (sequence = row in
        seq_ids): built once per decode step, valid for every layer's `storage`."""
        slots, seq_index, positions = self.batch_slots(seq_ids)
        return TokenLayout.build(seq_index, positions, rows=slots)

    def gather_batch(self, layer: int, seq_ids: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Packed local K, V `[sum L_local, Hkv, D]`, seq_index `[sum L_local]` (row in seq_ids), positions."""
        slots, seq_index, positions = self.batch_slots(seq_ids)
        k, v = self.read(layer, slots)
        return k, v, seq_index, positions
