"""Prefill attention over a KV cache sharded by sequence: chunks and suffixes of cached prefixes.

With prefix caching and chunked prefill, a step's new tokens attend to K/V that
already sit in every rank's cache (an earlier chunk, a reused prefix) plus their
own, which each rank writes into its cache before attending. Every rank holds
queries only for the new tokens it owns, and keys for everything it caches. Then:

- pass-KV (`ring`): each rank packs its cached K/V of the step's sequences into one
  message and the messages travel the ring, overlapped with compute. Sends
  (W - 1) * 2 * Hkv * D values per cached token per rank. Ranks on one host instead
  publish their message once in shared memory (`HostExchange`) and read the peers'
  in place, in the ring's order: no transfer to overlap, one copy per rank. (Pass-Q
  does the same with its queries and partial outputs.)
- pass-Q (`pass_q`): queries travel the ring, cached K/V stay in place (read
  straight from the paged storage), and partial outputs return by one all-to-all
  to be merged by LSE. Sends (W - 1) * Hq * D per new token plus the partials:
  less than pass-KV when the new tokens are few next to the cached ones (Meta's
  context-parallelism paper: pass-Q when T / (T + P) <= 2 Hkv / Hq).
- `allgather`: every rank gathers every rank's packed K/V, then attends locally.

All three are exact: each query's partial results over disjoint key sets are
merged by log-sum-exp; the causal rule uses true positions.

Shapes: q [T_local, Hq, D]; storage kh, vh [Hkv, S, D] (head-major, S slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.shm import HostExchange
from seqpar.kernels.layout import Run, TokenLayout
from seqpar.strategies.registry import get


@dataclass(frozen=True)
class CachedKeys:
    """Where every rank's cached keys of a step lie.

    in_storage[r]: rank r's keys, rows = slots of rank r's storage (read in place there);
    packed[r]: the same keys, rows 0..n_r-1, the order `slot_ranges` packs them in;
    slot_ranges: this rank's key slots in packed order, as [start, end) ranges of storage.
    `local_in_place` (a sliding-window layer's keys): packed[r] holds only the keys of rank r that
    queries of other ranks can see, the messages it sends; rank r attends its own keys in place
    through in_storage[r] (those its own queries can see, and the others').
    """

    in_storage: list[TokenLayout]
    packed: list[TokenLayout]
    slot_ranges: list[tuple[int, int]]
    local_in_place: bool = False

    @property
    def num_local(self) -> int:
        return sum(b - a for a, b in self.slot_ranges)


def pass_kv_for_meta(num_new: int, num_cached: int, num_q_heads: int, num_kv_heads: int) -> bool:
    """Meta's rule (arXiv 2411.01783): pass-KV unless the new tokens are few next to the cached."""
    total = num_new + num_cached
    return total == 0 or num_new / total > 2 * num_kv_heads / num_q_heads


def slot_ranges(runs: list[Run]) -> list[tuple[int, int]]:
    """Storage runs as [start, end) slot ranges in their order, runs adjacent in storage joined."""
    ranges: list[tuple[int, int]] = []
    for r in runs:
        if ranges and ranges[-1][1] == r.start:
            ranges[-1] = (ranges[-1][0], r.start + r.length)
        else:
            ranges.append((r.start, r.start + r.length))
    return ranges


# Above this many ranges one gather beats slice copies (blocks scattered over storage).
SLICE_PACK_MAX = 64
# Pass-KV and pass-Q through shared memory take messages up to this many bytes per rank (larger:
# the process group); the buffer holds 2 x W of them.
KV_EXCHANGE_MAX = 32 << 20


def kv_exchange_bytes(cache_tokens: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """The shared-memory buffer per rank for pass-KV (one layer of its whole cache, capped), which
    pass-Q's queries and partials use too."""
    return min(2 * kv_heads * head_dim * itemsize * cache_tokens, KV_EXCHANGE_MAX)


def kv_message_shapes(keys: CachedKeys, kv_heads: int, head_dim: int) -> list[tuple[int, ...]]:
    """Every rank's pass-KV message [2, Hkv, n_r, D] of this step (known alike on every rank)."""
    return [(2, kv_heads, len(lay), head_dim) for lay in keys.packed]


def pack(kh: Tensor, vh: Tensor, keys: CachedKeys) -> Tensor:
    """This rank's cached K/V as one message [2, Hkv, n, D], in packed order.

    A sequence's blocks mostly sit in long stretches of storage: copying those slices is a
    memcpy per head, several times faster than a gather by slot (which a chunk pays every layer).
    """
    ranges = keys.slot_ranges
    out = kh.new_empty(2, kh.shape[0], keys.num_local, kh.shape[2])
    if len(ranges) > SLICE_PACK_MAX:
        idx = torch.cat([torch.arange(a, b) for a, b in ranges]).to(kh.device)
        torch.index_select(kh, 1, idx, out=out[0])
        torch.index_select(vh, 1, idx, out=out[1])
        return out
    row = 0
    for a, b in ranges:
        out[0, :, row : row + b - a] = kh[:, a:b]
        out[1, :, row : row + b - a] = vh[:, a:b]
        row += b - a
    return out


def attention_over_cache(
    q: Tensor,
    q_layouts: list[TokenLayout],
    kh: Tensor,
    vh: Tensor,
    keys: CachedKeys,
    group: dist.ProcessGroup | None,
    strategy: str,
    scale: float | None,
    exchange: HostExchange | None = None,
    window: int | None = None,
) -> Tensor:
    """Exact causal attention of this rank's new-token queries over every rank's cache, by the
    registered strategy's `over_cache` (ring.py, pass_q.py, allgather.py).

    q_layouts[r]: rank r's queries (rows 0..T_r-1; true positions). Returns out [T_local, Hq, D] fp32.
    `exchange`: the group's shared-memory exchange for pass-KV and pass-Q messages, when its ranks share a host.
    `window`: a sliding-window layer's window (keys at positions (p - window, p] from a query at p).
    """
    return get(strategy, over_cache=True).over_cache(q, q_layouts, kh, vh, keys, group, scale, exchange, window)
