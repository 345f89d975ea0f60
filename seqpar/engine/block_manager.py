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

from seqpar.engine.kv_cache import KVGroups
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
    """Every SP rank's pool of blocks, shared by the layer groups (`KVGroups`): `seq.blocks[g][i]` is
    group g's block of logical block i, on rank `placement.owner(i)`, or -1 where a sliding-window
    group has freed it (it left every window of the sequence's later queries)."""

    def __init__(
        self,
        placement: Placement,
        num_blocks: int,
        enable_prefix_caching: bool = True,
        store: Any = None,
        groups: KVGroups | None = None,
    ) -> None:
        self.placement = placement
        self.store = store  # kv_store.DriverStore: which blocks the ranks can load from disk, or None
        self.block_size = placement.block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.groups = groups or KVGroups.of([None])
        self.pools = [BlockPool(num_blocks) for _ in range(placement.sp_size)]
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached
        self.store_hits = 0  # prompt tokens loaded from the KV store

    def usage(self) -> list[float]:
        """Fraction of each rank's blocks in use (cached but unreferenced blocks count as free)."""
        return [1.0 - p.available() / p.num_blocks for p in self.pools]

    def _first(self, g: int, position: int) -> int:
        """Group g's first logical block that queries at `position` and after can see."""
        return self.groups.first_block(g, position, self.block_size)

    def _fits(self, blocks) -> bool:
        """Whether every rank has a free (or evictable) block for each of these logical blocks it owns."""
        need = [0] * len(self.pools)
        for i in blocks:
            need[self.placement.owner(i)] += 1
        return all(n <= p.available() for n, p in zip(need, self.pools))

    def _longest(self, start: int, stop: int, has) -> int:
        """The most blocks m in [start, stop] such that `has(i, g)` for every group's blocks i in
        [max(start, first block m's queries see), m): the blocks before `start` are held already."""
        groups, bs = range(len(self.groups)), self.block_size
        run = [0] * len(self.groups)  # per group: blocks in a row from `start` on that `has`, ending at i
        best = start
        for i in range(start, stop):
            for g in groups:
                run[g] = run[g] + 1 if has(i, g) else 0
            if all(run[g] >= i + 1 - max(start, self._first(g, (i + 1) * bs)) for g in groups):
                best = i + 1
            elif any(self.groups.windows[g] is None and not run[g] for g in groups):
                break  # a global group's gap ends every longer prefix
        return best

    def match_prefix(self, seq: Sequence) -> int:
        """Reuse the longest cached prefix of a sequence that holds no blocks; returns its tokens.

        At least one token is always left to compute: its logits start the generation.
        Requests that want prompt logprobs compute every position (as in vLLM). A window group needs
        only the blocks the prefix's last window reaches.
        """
        assert not seq.blocks, "match_prefix on a sequence that already holds blocks"
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        tokens, bs, key = seq.all_token_ids, self.block_size, self.groups.key
        limit = (len(tokens) - 1) // bs
        hashes: list[bytes] = []
        for i in range(limit):
            hashes.append(chain_hash(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
            if self.groups.windows[0] is None and key(hashes[-1], 0) not in self.pools[self.placement.owner(i)].by_hash:
                break  # group 0 is global (when any is): no longer prefix can match
        n = self._longest(0, len(hashes), lambda i, g: key(hashes[i], g) in self.pools[self.placement.owner(i)].by_hash)
        seq.blocks = [[-1] * n for _ in self.groups.layers]
        for g, table in enumerate(seq.blocks):
            for i in range(self._first(g, n * bs), n):
                pool = self.pools[self.placement.owner(i)]
                table[i] = pool.by_hash[key(hashes[i], g)]
                pool.touch(table[i])
        seq.block_hashes = hashes[:n]
        self.prefix_queries += len(tokens)
        self.prefix_hits += n * bs
        if self.store is not None:
            self._match_store(seq, limit)
        return len(seq.block_hashes) * bs

    def _match_store(self, seq: Sequence, limit: int) -> None:
        """Extend a matched prefix with the following blocks found in the KV store: each gets a block
        now and is listed in `seq.loads` as (logical block, group); the driver has the ranks load them
        before the step and registers them (`loaded`)."""
        tokens, bs, key, owner = seq.all_token_ids, self.block_size, self.groups.key, self.placement.owner
        n = len(seq.block_hashes)
        hashes = list(seq.block_hashes)
        for i in range(n, limit):
            hashes.append(chain_hash(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        # Only new blocks: a failed load recomputes every block after it, which must not be shared.
        # Blocks before n are the cache's (held already); from n on, the store's.
        m = self._longest(n, limit, lambda i, g: self.store.has(owner(i), key(hashes[i], g)))
        # as many as every rank has room for
        while m > n and not self._fits(
            i for g in range(len(self.groups)) for i in range(max(n, self._first(g, m * bs)), m)
        ):
            m -= 1
        if m == n:
            return
        for g, table in enumerate(seq.blocks):
            table.extend([-1] * (m - n))
            for i in range(max(n, self._first(g, m * bs)), m):
                table[i] = self.pools[owner(i)].take()
                seq.loads.append((i, g))
        seq.block_hashes = hashes[:m]

    def loaded(self, seq: Sequence, first_failed: int | None) -> int:
        """After the ranks loaded `seq.loads`: register the blocks before the first failure (None: all
        loaded) as computed, forget the rest (recomputed from there); returns the tokens loaded. With
        window groups the computation restarts where every window group holds the window before it:
        at the first failure if the loads reach back that far, else where the cache's prefix ended."""
        if first_failed is not None and seq.loads:
            start = min(i for i, _ in seq.loads)
            for g, table in enumerate(seq.blocks):
                if any(b < 0 for b in table[self._first(g, first_failed * self.block_size) : first_failed]):
                    first_failed = start
                    break
        keep = [(i, g) for i, g in seq.loads if first_failed is None or i < first_failed]
        for i, g in keep:
            self.pools[self.placement.owner(i)].register(seq.blocks[g][i], self.groups.key(seq.block_hashes[i], g))
        if first_failed is not None:
            del seq.block_hashes[first_failed:]
        blocks = len({i for i, _ in keep})
        seq.loads = []
        self.store_hits += blocks * self.block_size
        return blocks * self.block_size

    def filled_blocks(self, seq: Sequence, end: int) -> list[tuple[int, int, bytes]]:
        """(SP rank, block, group's hash) of every group's full blocks that computing up to position
        `end` fills."""
        tokens, bs = seq.all_token_ids, self.block_size
        h = seq.block_hashes[-1] if seq.block_hashes else None
        out = []
        for i in range(len(seq.block_hashes), end // bs):
            h = chain_hash(h, tokens[i * bs : (i + 1) * bs])
            out += [(self.placement.owner(i), t[i], self.groups.key(h, g)) for g, t in enumerate(seq.blocks)]
        return out

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give the sequence the blocks that computing positions [num_computed_tokens, num_tokens) needs
        in every group (for a window group, also those its window reaches back to that it lacks): all on
        every rank, or none."""
        tables = seq.blocks or [[] for _ in self.groups.layers]
        end = blocks_needed(num_tokens, self.block_size)
        want = []  # (group, logical block)
        for g, table in enumerate(tables):
            # a global group holds every block below its table's end; a window group may lack some
            # in its window (freed, or never loaded after a failed load)
            first = len(table) if self.groups.windows[g] is None else self._first(g, seq.num_computed_tokens)
            want += [(g, i) for i in range(first, end) if i >= len(table) or table[i] < 0]
        if not self._fits(i for _, i in want):
            return False
        for table in tables:
            table.extend([-1] * (end - len(table)))
        for g, i in want:
            tables[g][i] = self.pools[self.placement.owner(i)].take()
        seq.blocks = tables
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register by hash the blocks the sequence has filled since the last call; then free the window
        groups' blocks that no later query of the sequence can see."""
        tokens, bs = seq.all_token_ids, self.block_size
        if self.enable_prefix_caching:
            for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
                prev = seq.block_hashes[-1] if seq.block_hashes else None
                h = chain_hash(prev, tokens[i * bs : (i + 1) * bs])
                seq.block_hashes.append(h)
                for g, table in enumerate(seq.blocks):
                    self.pools[self.placement.owner(i)].register(table[i], self.groups.key(h, g))
        for g, table in enumerate(seq.blocks):
            if self.groups.windows[g] is None:
                continue
            first = min(self._first(g, seq.num_computed_tokens), len(table))
            for i in range(seq.released.get(g, 0), first):  # oldest first: evicted first once unreferenced
                if table[i] >= 0:
                    self.pools[self.placement.owner(i)].release(table[i])
                    table[i] = -1
            seq.released[g] = max(first, seq.released.get(g, 0))

    def max_tokens(self, chunk: int, limit: int) -> int:
        """The longest sequence, up to `limit` tokens, whose blocks fit alone in every rank's pool: every
        global group's block for each of its blocks, a window group's for at most its window and a
        chunk of `chunk` tokens (a model of window layers alone holds the same blocks at any length)."""
        bs = self.block_size
        peaks = [None if w is None else blocks_needed(w - 1 + chunk, bs) + 2 for w in self.groups.windows]
        counts = [0] * len(self.pools)
        i = 0
        while i * bs < limit:
            r = self.placement.owner(i)
            c = counts[r] + 1
            if sum(c if p is None else min(c, p) for p in peaks) > self.num_blocks:
                return i * bs
            counts[r] = c
            i += 1
        return limit

    def held(self, seq: Sequence) -> list[int]:
        """Blocks the sequence holds on each rank, every group together."""
        counts = [0] * len(self.pools)
        for g, table in enumerate(seq.blocks):
            for i in range(seq.released.get(g, 0), len(table)):  # a window group's blocks below: freed
                if table[i] >= 0:
                    counts[self.placement.owner(i)] += 1
        return counts

    def free(self, seq: Sequence) -> None:
        """Drop every block reference of a sequence; filled blocks stay cached for reuse.

        Released last block first, so a prefix's tail is evicted before its head.
        """
        for table in seq.blocks:
            for i in reversed(range(len(table))):
                if table[i] >= 0:
                    self.pools[self.placement.owner(i)].release(table[i])
        seq.blocks = []
        seq.block_hashes.clear()
        seq.loads.clear()
        seq.num_computed_tokens = 0
        seq.released.clear()
