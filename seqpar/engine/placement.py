"""Where a sequence's tokens live: which SP rank holds each logical KV block.

Placement is a pure function of position, so the same prompt prefix lands on the same ranks
whatever follows it (prefix caching needs that): a sequence's positions are cut into *shard
units* of `shard_blocks` whole KV blocks, and unit u goes to a rank by the scheme:
- snake: units dealt as in a snake draft, period 2W: ranks 0..W-1, then W-1..0, again and
  again, so an early unit pairs with a late one and causal work stays balanced. (Not
  `ShardPlan`'s zigzag, which cuts a whole sequence into 2W chunks, two per rank; for a
  sequence of exactly 2W units the two agree. "zigzag" was this scheme's name: the engine's
  config still accepts it.)
- striped: unit u on rank u mod W.
Decoded tokens follow the same rule. The driver's block manager, the ranks' step plans and the
cost model's `auto` all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from seqpar.kernels.layout import Run

SHARD_SCHEMES = ("snake", "striped")
SCHEME_ALIASES = {"zigzag": "snake"}  # the old name of the snake scheme, still accepted by EngineConfig


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens (ceil division)."""
    if num_tokens < 0 or block_size <= 0:
        raise ValueError(f"need num_tokens >= 0 and block_size > 0, got {num_tokens}, {block_size}")
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class Placement:
    """Which SP rank holds each logical KV block of every sequence."""

    sp_size: int
    block_size: int
    shard_blocks: int = 16
    scheme: str = "snake"

    def __post_init__(self) -> None:
        if self.scheme not in SHARD_SCHEMES:
            raise ValueError(
                f"scheme={self.scheme!r}: the engine shards prompts in whole KV blocks, "
                f"snake or striped over units; choose one of {', '.join(SHARD_SCHEMES)}"
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
        storage slots. Neighbouring blocks that are adjacent both in position and in storage form one run.
        Blocks given as -1 (a window group's freed ones) hold no keys."""
        per_rank: list[list[Run]] = [[] for _ in range(self.sp_size)]
        bs = self.block_size
        for i in range(blocks_needed(num_tokens, bs)):
            if blocks[i] < 0:
                continue
            runs = per_rank[self.owner(i)]
            n = min(bs, num_tokens - i * bs)
            slot = blocks[i] * bs
            last = runs[-1] if runs else None
            if last is not None and last.pos + last.length == i * bs and last.start + last.length == slot:
                runs[-1] = Run(last.start, last.length + n, seq, last.pos, 1)
            else:
                runs.append(Run(slot, n, seq, i * bs, 1))
        return per_rank
