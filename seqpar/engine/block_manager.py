"""The driver's book of every SP rank's KV blocks: the one source of truth for what lives where.

Each rank's blocks have a reference count; a block is free (never filled, or its
contents forgotten), cached (reference count 0 but its contents known by hash, so a
later request may reuse it; evicted least recently used first when space runs out),
or in use. A full block is known by a chained hash of every token up to its end, so
equal hashes mean equal K/V (positions are fixed by the block index). Because the
placement of a block depends only on its index (`Placement`), a prompt's prefix is
found on the same ranks whatever follows it.

Ranks hold no book of their own: each step tells them the physical block of every
logical block of every sequence in the step, and they write and read there.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from typing import Any

from seqpar.engine.placement import Placement, blocks_needed
from seqpar.engine.sequence import Sequence


def chain_hash(prev: bytes | None, tokens: list[int]) -> bytes:
    """Hash of a full block given the hash of the block before it (None for the first)."""
    h = hashlib.blake2b(prev or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockPool:
    """One SP rank's blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # A min-heap: the lowest free id first, so a sequence's blocks tend to be consecutive in
        # storage, which the kernels read as one run (a scattered cache means many tiny calls).
        self.free: list[int] = list(range(num_blocks))
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.cached: OrderedDict[int, None] = OrderedDict()  # reference count 0 but reusable; LRU first

    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def take(self) -> int:
        """A block for new contents: a free one, else the least recently used cached one (forgotten)."""
        if self.free:
            b = heapq.heappop(self.free)
        else:
            b, _ = self.cached.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
        self.ref[b] = 1
        return b

    def touch(self, b: int) -> None:
        """One more reference to a block found by hash."""
        if self.ref[b] == 0:
            del self.cached[b]
        self.ref[b] += 1

    def release(self, b: int) -> None:
        if self.ref[b] < 1:
            raise RuntimeError(f"block {b} released with no reference held (a double free)")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if b in self.hash_of:
                self.cached[b] = None  # most recently used: evicted last
            else:
                heapq.heappush(self.free, b)

    def register(self, b: int, h: bytes) -> None:
        """Remember a full block's contents by hash (the first block with those contents wins)."""
        if h not in self.by_hash and b not in self.hash_of:
            self.by_hash[h] = b
            self.hash_of[b] = h


class BlockManager:
    def __init__(
        self, placement: Placement, num_blocks: int, enable_prefix_caching: bool = True, store: Any = None
    ) -> None:
        self.placement = placement
        self.store = store  # kv_store.DriverStore: which blocks the ranks can load from disk, or None
        self.block_size = placement.block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [BlockPool(num_blocks) for _ in range(placement.sp_size)]
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached
        self.store_hits = 0  # prompt tokens loaded from the KV store

    def usage(self) -> list[float]:
        """Fraction of each rank's blocks in use (cached but unreferenced blocks count as free)."""
        return [1.0 - p.available() / p.num_blocks for p in self.pools]

    def match_prefix(self, seq: Sequence) -> int:
        """Reuse the longest cached prefix of a sequence that holds no blocks; returns its tokens.

        At least one token is always left to compute: its logits start the generation.
        Requests that want prompt logprobs compute every position (as in vLLM).
        """
        assert not seq.blocks, "match_prefix on a sequence that already holds blocks"
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        tokens, bs = seq.all_token_ids, self.block_size
        h = None
        for i in range((len(tokens) - 1) // bs):
            h = chain_hash(h, tokens[i * bs : (i + 1) * bs])
            pool = self.pools[self.placement.owner(i)]
            b = pool.by_hash.get(h)
            if b is None:
                break
            pool.touch(b)
            seq.blocks.append(b)
            seq.block_hashes.append(h)
        self.prefix_queries += len(tokens)
        self.prefix_hits += len(seq.blocks) * bs
        if self.store is not None:
            self._match_store(seq, (len(tokens) - 1) // bs)
        return len(seq.blocks) * bs

    def _match_store(self, seq: Sequence, limit: int) -> None:
        """Extend a matched prefix with the following blocks found in the KV store: each gets a block
        now and is listed in `seq.loads`; the driver has the ranks load them before the step and
        registers them (`loaded`)."""
        tokens, bs = seq.all_token_ids, self.block_size
        for i in range(len(seq.blocks), limit):
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens[i * bs : (i + 1) * bs])
            r = self.placement.owner(i)
            # Only new blocks: a failed load recomputes every block after it, which must not be shared.
            if not self.pools[r].available() or not self.store.has(r, h):
                break
            seq.blocks.append(self.pools[r].take())
            seq.block_hashes.append(h)
            seq.loads.append(i)

    def loaded(self, seq: Sequence, first_failed: int | None) -> int:
        """After the ranks loaded `seq.loads`: register the blocks before the first failure (None: all
        loaded) as computed, forget the rest (recomputed from there); returns the tokens loaded."""
        keep = [i for i in seq.loads if first_failed is None or i < first_failed]
        for i in keep:
            self.pools[self.placement.owner(i)].register(seq.blocks[i], seq.block_hashes[i])
        if first_failed is not None:
            del seq.block_hashes[first_failed:]
        seq.loads = []
        self.store_hits += len(keep) * self.block_size
        return len(keep) * self.block_size

    def filled_blocks(self, seq: Sequence, end: int) -> list[tuple[int, int, bytes]]:
        """(SP rank, physical block, hash) of the full blocks that computing up to position `end` fills."""
        tokens, bs = seq.all_token_ids, self.block_size
        h = seq.block_hashes[-1] if seq.block_hashes else None
        out = []
        for i in range(len(seq.block_hashes), end // bs):
            h = chain_hash(h, tokens[i * bs : (i + 1) * bs])
            out.append((self.placement.owner(i), seq.blocks[i], h))
        return out

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give the sequence blocks for positions [0, num_tokens): all on every rank, or none."""
        first = len(seq.blocks)
        new = range(first, blocks_needed(num_tokens, self.block_size))
        need = [0] * len(self.pools)
        for i in new:
            need[self.placement.owner(i)] += 1
        if any(n > p.available() for n, p in zip(need, self.pools)):
            return False
        seq.blocks.extend(self.pools[self.placement.owner(i)].take() for i in new)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register by hash the blocks the sequence has filled since the last call."""
        if not self.enable_prefix_caching:
            return
        tokens, bs = seq.all_token_ids, self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(prev, tokens[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            self.pools[self.placement.owner(i)].register(seq.blocks[i], h)

    def free(self, seq: Sequence) -> None:
        """Drop every block reference of a sequence; filled blocks stay cached for reuse.

        Released last block first, so a prefix's tail is evicted before its head.
        """
        for i in reversed(range(len(seq.blocks))):
            self.pools[self.placement.owner(i)].release(seq.blocks[i])
        seq.blocks.clear()
        seq.block_hashes.clear()
        seq.loads.clear()
        seq.num_computed_tokens = 0
