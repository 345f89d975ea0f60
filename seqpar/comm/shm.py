"""All-gather through shared memory among the ranks of a group that share one host.

Decode merges one small partial per layer (a few KB), and a gloo collective costs
~1 ms of loopback TCP and thread wake-ups for it on a busy CPU: most of a decode
step at 30 layers. Ranks on one host can instead write their part into a shared
buffer and signal each peer with one byte through a pipe (a FIFO per rank): ~0.1 ms.
The pipe write/read pair is a system call on each side, so it also orders the
buffer writes before the peers' reads on any CPU. (vLLM and SGLang use shared
memory for their CPU collectives for the same reason.)

Protocol, per call: write my part into slot [parity, me], send my rank number to
every peer, wait until every peer's byte has come, copy all W parts out. Calls
alternate between two buffers (parity = call count % 2): a rank can be at most one
call ahead of a peer (it cannot finish call t + 1 without the peer's part), so it
never overwrites a part that a peer is still reading. A peer that sends nothing for
`timeout_s` (dead or stuck) raises instead of hanging.

The files live in /dev/shm only while the group sets up: once every rank has mapped
the buffer and opened the pipes they are unlinked, so nothing is left behind.
"""

from __future__ import annotations

import os
import select
import shutil
import tempfile
import uuid

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import STATS, nbytes

_MAX_RANKS = 256  # a signal is one byte: the sender's rank


class HostExchange:
    """`all_gather` of equal-shaped tensors (at most `capacity` bytes) among one host's ranks."""

    def __init__(self, buffer: Tensor, rank: int, world: int, capacity: int, read_fd: int,
                 write_fds: dict[int, int], timeout_s: float):
        self._buffer = buffer  # uint8 [2, W, capacity], shared with the peers
        self.rank, self.world, self.capacity = rank, world, capacity
        self._read_fd, self._write_fds = read_fd, write_fds
        self._timeout_s = timeout_s
        self._calls = 0
        self._early: dict[int, int] = {}  # peer -> bytes from its next call, read ahead of time

    @staticmethod
    def create(group: dist.ProcessGroup | None, capacity: int, timeout_s: float = 1800.0) -> "HostExchange | None":
        """Collective over `group`. None when the group has one rank, or its ranks do not all
        see one shared-memory folder (they span hosts): callers then use the process group."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if world == 1 or world > _MAX_RANKS:
            return None
        capacity = -(-capacity // 64) * 64  # every slot aligned for any dtype
        token = uuid.uuid4().hex
        folder = None
        if rank == 0:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            folder = tempfile.mkdtemp(prefix="seqpar-exchange-", dir=base)
            with open(os.path.join(folder, "token"), "w") as f:
                f.write(token)
            with open(os.path.join(folder, "buffer"), "wb") as f:
                f.truncate(2 * world * capacity)
        box = [folder, token]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        folder, token = box
        visible = _reads_token(folder, token)
        seen: list[bool] = [False] * world
        dist.all_gather_object(seen, visible, group=group)
        if not all(seen):
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            return None
        fifo = os.path.join(folder, f"rank{rank}")
        os.mkfifo(fifo)
        read_fd = os.open(fifo, os.O_RDWR)  # read-write: opening never blocks, and no EOF while peers come and go
        buffer = torch.from_file(os.path.join(folder, "buffer"), shared=True, size=2 * world * capacity, dtype=torch.uint8)
        dist.barrier(group=group)
        write_fds = {peer: os.open(os.path.join(folder, f"rank{peer}"), os.O_WRONLY) for peer in range(world) if peer != rank}
        dist.barrier(group=group)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # mappings and open pipes outlive their names
        return HostExchange(buffer.view(2, world, capacity), rank, world, capacity, read_fd, write_fds, timeout_s)

    def fits(self, t: Tensor) -> bool:
        return t.device.type == "cpu" and nbytes(t) <= self.capacity

    def all_gather(self, t: Tensor) -> Tensor:
        """Every rank's t (same shape and dtype everywhere) -> [W, *t.shape], a fresh tensor."""
        if not self.fits(t):
            raise ValueError(f"HostExchange.all_gather: a {t.device.type} tensor of {nbytes(t)} bytes does not fit "
                             f"the {self.capacity}-byte CPU buffer; use the process group for it")
        n = nbytes(t)
        slots = self._buffer[self._calls % 2]  # [W, capacity]
        self._calls += 1
        slots[self.rank, :n].view(t.dtype).view(t.shape).copy_(t)
        me = bytes([self.rank])
        for fd in self._write_fds.values():
            os.write(fd, me)
        STATS.add("host_all_gather", n)  # written once; every peer reads it
        self._wait_for_peers()
        return slots[:, :n].clone().view(t.dtype).view(self.world, *t.shape)

    def _wait_for_peers(self) -> None:
        pending = set(self._write_fds)
        for peer in list(self._early):  # a peer already one call ahead sent its byte during our last wait
            pending.discard(peer)
            self._early[peer] -= 1
            if not self._early[peer]:
                del self._early[peer]
        while pending:
            ready, _, _ = select.select([self._read_fd], [], [], self._timeout_s)
            if not ready:
                raise RuntimeError(
                    f"HostExchange: rank(s) {sorted(pending)} of this host's group sent nothing for "
                    f"{self._timeout_s:.0f} s: a peer died or is stuck; the whole group has to be restarted"
                )
            for peer in os.read(self._read_fd, _MAX_RANKS):
                if peer in pending:
                    pending.discard(peer)
                else:
                    self._early[peer] = self._early.get(peer, 0) + 1

    def close(self) -> None:
        for fd in [self._read_fd, *self._write_fds.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._write_fds = {}


def _reads_token(folder: str, token: str) -> bool:
    try:
        with open(os.path.join(folder, "token")) as f:
            return f.read() == token
    except OSError:
        return False
