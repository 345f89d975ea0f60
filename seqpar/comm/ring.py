"""Ring exchange: each rank sends a block to rank + 1 and receives one from rank - 1.

`send_recv` posts both transfers and returns at once, so the caller computes on
the block it holds while the next one is in flight; `wait` blocks until the
received block is usable. That overlap is the point of ring attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import STATS, group_rank, group_size, nbytes, on_host, staged
from seqpar.profiling import RING_POST, RING_WAIT, traced


class RingExchanger:
    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.world = group_size(group)
        self.rank = group_rank(group)
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world  # in the group
        self._next = dist.get_global_rank(group, nxt) if group is not None else nxt
        self._prev = dist.get_global_rank(group, prev) if group is not None else prev
        self._reqs: list[dist.Work] = []
        self._landing: tuple[Tensor, Tensor] | None = None  # (host buffer, device block) when staged

    @traced(RING_POST)
    def send_recv(self, send: Tensor, recv_shape: tuple[int, ...]) -> Tensor:
        """Start sending `send` forward and receiving a `recv_shape` block from behind."""
        if self._reqs:
            raise RuntimeError("RingExchanger.send_recv called again before wait(): one transfer at a time")
        block = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
        host = staged(send, self.group)
        send = (on_host(send) if host else send).contiguous()  # gloo sends only contiguous host memory
        recv = torch.empty(recv_shape, dtype=send.dtype) if host else block
        ops = [
            dist.P2POp(dist.isend, send, self._next, group=self.group),
            dist.P2POp(dist.irecv, recv, self._prev, group=self.group),
        ]
        STATS.add("ring", nbytes(send))
        self._reqs = dist.batch_isend_irecv(ops)
        self._landing = None if recv is block else (recv, block)  # staged: copied to the device at wait()
        return block

    @traced(RING_WAIT)
    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []
        if self._landing is not None:
            host, block = self._landing
            block.copy_(host)
            self._landing = None
