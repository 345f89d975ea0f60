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


def needle_document(each_side: int = 10) -> str:
    """The demo's haystack cut to `each_side` paragraphs either side of the needle (~1,650 tokens of
    the default model's chat prompt at 10, against ~4,100 whole): the needle tests' prompt."""
    from seqpar.cli import demo

    text, middle, _ = demo.document()
    paragraphs = text.split("\n\n")
    return "\n\n".join(paragraphs[max(0, middle - each_side) : middle + each_side + 1])
