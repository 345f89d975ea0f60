"""Counted collectives: every byte a rank sends is recorded, so tests and benchmarks
can check each strategy's volume against its formula.

All functions take their process group explicitly. Where the group is gloo and the tensors are
CUDA ones (ranks sharing one GPU: NCCL refuses two ranks on a device, see `launch.gpu_placement`),
they travel through host memory: copied to the host, exchanged, copied back (`staged`, `on_host`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.profiling import COLLECTIVE, traced


@dataclass
class CommStats:
    """Bytes this process has sent, by operation name. Reset between measurements."""

    sent: Counter = field(default_factory=Counter)

    def add(self, op: str, nbytes: int) -> None:
        self.sent[op] += int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()


# A per-process meter (like a metrics registry); it holds numbers, never a group.
STATS = CommStats()

# While a step is captured as CUDA graphs cut at its collectives (engine/decode_graph.Pieces): how
# the capture is cut around one. None otherwise.
_CUT: Callable | None = None


def outside_graphs(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """`fn(*args)`: a collective's whole call, kept out of any CUDA graph being captured. The capture
    ends before it and resumes after, and every replay runs it between those two pieces: gloo's
    staging through host memory and the shared-memory exchange cannot be captured (NCCL's kernels
    could be, not the host's work)."""
    return fn(*args) if _CUT is None else _CUT(fn, *args)


@contextmanager
def cut_by(cut: Callable) -> Iterator[None]:
    """`outside_graphs` hands its calls to `cut(fn, *args)` inside the block."""
    global _CUT
    _CUT = cut
    try:
        yield
    finally:
        _CUT = None


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def staged(x: Tensor, group: dist.ProcessGroup | None) -> bool:
    """Whether x must go through host memory: a CUDA tensor in a gloo group (gloo moves CPU tensors)."""
    return x.device.type == "cuda" and dist.get_backend(group) == "gloo"


def on_host(x: Tensor) -> Tensor:
    """A host copy of a tensor that `staged` says must go through host memory."""
    return x.to("cpu", copy=True)


@traced(COLLECTIVE)
def all_gather_uneven(x: Tensor, counts: list[int] | tuple[int, ...], group: dist.ProcessGroup | None) -> list[Tensor]:
    """Gather every rank's x [counts[r], ...]; returns the W parts in rank order.

    gloo's all_gather needs equal sizes, so each part is padded to max(counts):
    the sender ships (W - 1) copies of its padded part.
    """
    world = len(counts)
    if world == 1:
        return [x]
    pad_to = max(counts)
    host = staged(x, group)
    send = x.new_zeros((pad_to, *x.shape[1:]), device="cpu" if host else x.device)
    send[: x.shape[0]] = x
    recv = [torch.empty_like(send) for _ in range(world)]
    STATS.add("all_gather", (world - 1) * nbytes(send))
    dist.all_gather(recv, send, group=group)
    if host:  # back to the device in one copy
        recv = list(torch.stack(recv).to(x.device))
    return [r[:n] for r, n in zip(recv, counts)]


@traced(COLLECTIVE)
def all_to_all(send: list[Tensor], recv_shapes: list[tuple[int, ...]], group: dist.ProcessGroup | None) -> list[Tensor]:
    """Send send[j] to rank j, receive a tensor of recv_shapes[j] from rank j (uneven sizes allowed).

    One flat `all_to_all_single` with split sizes; the part a rank keeps for
    itself is not counted as sent.
    """
    world = len(send)
    me = group_rank(group)
    if world == 1:
        return [send[0]]
    host = staged(send[0], group)
    flat_in = torch.cat([s.reshape(-1) for s in send])
    if host:
        flat_in = on_host(flat_in)
    in_splits = [s.numel() for s in send]
    out_splits = [int(torch.Size(shape).numel()) for shape in recv_shapes]
    flat_out = torch.empty(sum(out_splits), dtype=flat_in.dtype, device=flat_in.device)
    STATS.add("all_to_all", sum(n for j, n in enumerate(in_splits) if j != me) * send[0].element_size())
    dist.all_to_all_single(flat_out, flat_in, out_splits, in_splits, group=group)
    if host:
        flat_out = flat_out.to(send[0].device)
    return [part.view(shape) for part, shape in zip(flat_out.split(out_splits), recv_shapes)]


@traced(COLLECTIVE)
def all_reduce(x: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce. Counted as a ring all-reduce: 2 (W - 1) / W of the tensor per rank."""
    world = group_size(group)
    if world == 1:
        return x
    STATS.add("all_reduce", 2 * (world - 1) * nbytes(x) // world)
    sum_over(x, group, op)
    return x


def sum_over(x: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce, not counted (tensor parallelism's sums are not a strategy's traffic)."""
    if not staged(x, group):
        dist.all_reduce(x, op=op, group=group)
        return x
    host = on_host(x)
    dist.all_reduce(host, op=op, group=group)
    return x.copy_(host)
