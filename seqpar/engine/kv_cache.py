"""The KV cache of ONE sequence-parallel rank: its storage, what a block of it costs, and how the
layers share its blocks (`KVGroups`).

Which rank holds which block is `placement.py`; the driver's block manager decides which
physical block holds each logical block (`blocks[i]` holds positions
[i * block_size, (i + 1) * block_size) on rank `owner(i)`); a rank only stores K/V where it
is told. A slot is `block * block_size + offset`, an index into the flat storage.

Storage is head-major, `[num_layers, Hkv, num_slots, D]`: the kernels read a run of
consecutive slots of one layer as a view `[Hkv, n, D]`, so attention reads the cache
in place instead of copying every cached token once per layer and step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class KVGroups:
    """The layers in groups of equal size that share one pool of blocks (vLLM's hybrid KV cache).

    A block holds `block_size` positions of K/V for the `size` layers of one group; each group has
    its own block table per sequence. Global layers need every position, so their groups hold a
    block for every block of a sequence; a sliding-window layer's queries see only the last
    `window` positions, so its groups free the blocks that have left every window. Groups are the
    size of the smallest set of layers of one kind (global, or one window size), so a model
    without windows has one group of every layer and a block is what it always was.
    """

    layers: tuple[tuple[int, ...], ...]  # per group, its layers (the last group of a kind may be short)
    windows: tuple[int | None, ...]  # per group, its layers' window (None: global)
    size: int  # layers per block
    _where: dict[int, tuple[int, int]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = {layer: (g, j) for g, ls in enumerate(self.layers) for j, layer in enumerate(ls)}
        object.__setattr__(self, "_where", where)

    @classmethod
    def of(cls, windows: list[int | None]) -> KVGroups:
        """Groups for layers with these windows (None: a global layer); global groups first."""
        if not windows:
            raise ValueError("KVGroups: a model needs at least one layer")
        kinds: dict[int | None, list[int]] = {}
        for layer, w in enumerate(windows):
            kinds.setdefault(w, []).append(layer)
        size = min(len(v) for v in kinds.values())
        layers, wins = [], []
        for w in sorted(kinds, key=lambda w: -1 if w is None else w):
            for a in range(0, len(kinds[w]), size):
                layers.append(tuple(kinds[w][a : a + size]))
                wins.append(w)
        return cls(tuple(layers), tuple(wins), size)

    def __len__(self) -> int:
        return len(self.layers)

    def where(self, layer: int) -> tuple[int, int]:
        """(group, index in the cache's storage) of a layer."""
        return self._where[layer]

    def first_block(self, g: int, position: int, block_size: int) -> int:
        """The first logical block group `g` must hold for queries at `position` and after."""
        w = self.windows[g]
        return 0 if w is None else max(0, position - w + 1) // block_size

    def key(self, h: bytes, g: int) -> bytes:
        """The hash group `g`'s block of a chained token hash is known by (prefix cache, KV store)."""
        return h if g == 0 else hashlib.blake2b(h + g.to_bytes(4, "little"), digest_size=16).digest()


def kv_groups(mc) -> KVGroups:
    """A model's layer groups (`mc`: its ModelConfig)."""
    return KVGroups.of([mc.window(i) for i in range(mc.num_layers)])


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
    """Bytes one block costs: K and V for `num_layers` layers (a group's, `KVGroups.size`)."""
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
