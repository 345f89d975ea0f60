"""What a strategy costs, declared with the strategy: the bytes it sends and the seconds of one
layer's attention, for the cost model (`seqpar.costmodel`) to read from the registry.

The cost model sits above the strategies, so it hands each cost function the numbers it has
worked out (one layer's kernel time, the links' speeds, how fast memory copies) in the two
frames below; a strategy adds its own communication on top. Vocabulary: W ranks, `counts[r]`
the tokens rank r holds, Hq / Hkv query / KV heads, D head dim, b bytes per element of q/k/v.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

LSE_BYTES = 4  # partial results carry an fp32 log-sum-exp per query and head, whatever the model dtype


@dataclass(frozen=True)
class LayoutLayer:
    """One layer of a whole-prompt prefill on a TP x CP layout, equal shards (`seqpar plan`)."""

    attention_s: float  # this rank's causal attention FLOPs at the kernel's rate
    tokens_local: int  # T / CP
    cp: int
    hq: int  # heads of one TP rank
    hkv: int
    d: int
    b: int
    bandwidth: float  # of the CP link, bytes/s
    latency: float  # s per message

    def overlapped_ring_s(self, block_bytes: int) -> float:
        """CP steps of equal work; the first block is local, each later one arrives while the
        previous one computes."""
        step = self.attention_s / self.cp
        return step + (self.cp - 1) * max(step, block_bytes / self.bandwidth + self.latency)


@dataclass(frozen=True)
class StepLayer:
    """One layer of an engine step's prefill over the sharded cache, from a measured machine profile."""

    world: int
    hq: int
    hkv: int
    d: int
    b: int
    query_counts: list[int]  # new tokens each rank owns
    key_counts: list[int]  # keys each rank holds
    comp: list[list[float]]  # comp[r][j]: rank r's queries over rank j's packed keys, seconds
    comp_in_place: list[list[float]]  # the same, keys read where they lie in storage (or packed)
    packs_keys: bool  # keys too scattered in storage: reading in place packs them first
    kv_exchange_bytes: int  # messages up to this size go through shared memory (0: none)
    links: Mapping[str, Any]  # name -> a link with .seconds(nbytes): p2p, all_to_all, all_gather, shm
    copy_s: Callable[[float], float]  # seconds to copy this many bytes
    overlap: float  # 1: a transfer hides fully behind compute; 0: one after the other

    @property
    def partial(self) -> int:
        """Bytes of one query's (out, lse) partial."""
        return self.hq * (self.d + 1) * 4

    def overlapped(self, compute: float, move: float) -> float:
        return compute + move - self.overlap * min(compute, move)


# sent_bytes(counts, rank, hq, hkv, d, b) -> bytes `rank` sends in one layer's attention
BytesFn = Callable[[Sequence[int], int, int, int, int, int], int]


@dataclass(frozen=True)
class Cost:
    """A strategy's price. `sent_bytes` equals what the counted collectives record; `layout_s` and
    `step_s` give one layer's seconds, attention included (None: the cost model does not offer
    the strategy there)."""

    sent_bytes: BytesFn
    layout_s: Callable[[LayoutLayer], float] | None = None  # `seqpar plan`'s layouts
    step_s: Callable[[StepLayer], float] | None = None  # the engine's `auto`
    counts: Literal["keys", "queries"] = "keys"  # whose tokens `sent_bytes` counts in an engine step
    # Where it stands when `auto` finds a tie (one rank, an empty step): lowest first, so the
    # choice is deterministic.
    tie_rank: int = 0
