"""What engine tests share: the block books' invariant."""

from __future__ import annotations

from seqpar.engine.block_manager import BlockManager
from seqpar.engine.sequence import Sequence


def check_books(bm: BlockManager, live: list[Sequence]) -> None:
    """Assert the books balance: every reference held by a live sequence, each block in one state."""
    for r, pool in enumerate(bm.pools):
        refs = [0] * pool.num_blocks
        for seq in live:
            for table in seq.blocks:
                for i, b in enumerate(table):
                    if b >= 0 and bm.placement.owner(i) == r:
                        refs[b] += 1
        assert refs == pool.ref, f"rank {r}: reference counts {pool.ref} but live sequences hold {refs}"
        free = set(pool.free)
        states = [(b in free) + (b in pool.cached) + (pool.ref[b] > 0) for b in range(pool.num_blocks)]
        assert all(s == 1 for s in states), f"rank {r}: a block is in {max(states)} or 0 states at once"
