"""All-gather through shared memory among the ranks of a group that share one host.

Decode merges one small partial per layer (a few KB), and a gloo collective costs
~1 ms of loopback TCP and thread wake-ups for it on a busy CPU: most of a decode
step at 30 layers. Ranks on one host can instead write their part into a shared
buffer and raise a flag: ~0.05 ms. (vLLM and SGLang use shared memory for their
CPU collectives for the same reason.)

Protocol, per call t = 1, 2, ...: write my part into slot [t % 2, me], then set my
flag to t; wait until every peer's flag is >= t, copy all W parts out. A rank can be
at most one call ahead of a peer (it cannot finish call t + 1 without the peer's
part), so the two alternating slots mean it never overwrites a part that a peer is
still reading. Waiting spins briefly, then yields the CPU (ranks may outnumber
cores), then sleeps; a peer that raises nothing for `timeout_s` (dead or stuck)
raises an error instead of a hang.

A flag published after the data is seen after the data only where stores are not
reordered with stores nor loads with loads: x86-64's total store order. Elsewhere
`create` returns None and callers use the process group.

CUDA tensors (ranks sharing one GPU, which NCCL refuses) go through the same slots: each rank
copies its part to the host, and the gathered parts come back to its device in one copy.

The file lives in /dev/shm (this host's memory alone) while the group sets up: once
every rank has mapped it, it is unlinked, so nothing is left behind.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
import time
import uuid

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import STATS, nbytes

_FLAG_STRIDE = 8  # int64s per flag: each rank's flag on its own 64-byte cache line
_SPINS = 200  # flag checks (~1 us each) before yielding the CPU
_YIELD_S = 0.005  # then yield for this long before sleeping between checks
_SLEEP_S = 50e-6


class HostExchange:
    """`all_gather` of equal-shaped tensors (at most `capacity` bytes) among one host's ranks."""

    def __init__(self, flags: Tensor, slots: Tensor, rank: int, world: int, capacity: int, timeout_s: float):
        self._flags = flags  # int64 [W, _FLAG_STRIDE], column 0 is each rank's last finished write, 1 its pid
        self._slots = slots  # uint8 [2, W, capacity]
        flags[rank, 1] = os.getpid()
        self.rank, self.world, self.capacity = rank, world, capacity
        self._timeout_s = timeout_s
        self._calls = 0

    @staticmethod
    def supported() -> bool:
        return platform.machine().lower() in ("x86_64", "amd64") and hasattr(os, "sched_yield")

    @staticmethod
    def create(group: dist.ProcessGroup | None, capacity: int, timeout_s: float = 1800.0) -> HostExchange | None:
        """Collective over `group`. None (on every rank alike) when the group has one rank, a
        rank's CPU is not x86-64, or its ranks do not all see one folder in /dev/shm (they
        span hosts): callers then use the process group."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if world == 1:
            return None
        capacity = -(-capacity // 64) * 64  # every slot aligned for any dtype
        flag_bytes = world * _FLAG_STRIDE * 8
        size = flag_bytes + 2 * world * capacity
        token = uuid.uuid4().hex
        folder = None
        if rank == 0 and HostExchange.supported():
            folder = _make_buffer(size, token)
        box = [folder, token]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        folder, token = box
        seen: list[bool] = [False] * world
        # Every rank takes part in the decision (even one that cannot use it), so none hangs.
        dist.all_gather_object(seen, HostExchange.supported() and _reads_token(folder, token), group=group)
        if not all(seen):
            if rank == 0 and folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            return None
        buffer = torch.from_file(os.path.join(folder, "buffer"), shared=True, size=size, dtype=torch.uint8)
        dist.barrier(group=group)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # the mappings outlive the name
        dist.barrier(group=group)  # gone for everyone before anyone goes on
        flags = buffer[:flag_bytes].view(torch.int64).view(world, _FLAG_STRIDE)
        slots = buffer[flag_bytes:].view(2, world, capacity)
        exchange = HostExchange(flags, slots, rank, world, capacity, timeout_s)
        dist.barrier(group=group)  # every pid written before anyone may check one
        return exchange

    def fits(self, t: Tensor) -> bool:
        return t.device.type in _DEVICES and nbytes(t) <= self.capacity

    def all_gather(self, t: Tensor) -> Tensor:
        """Every rank's t (same shape and dtype everywhere) -> [W, *t.shape], a fresh tensor."""
        if not self.fits(t):
            raise ValueError(
                f"HostExchange.all_gather: a {t.device.type} tensor of {nbytes(t)} bytes does not fit "
                f"the {self.capacity}-byte CPU buffer; use the process group for it"
            )
        n = nbytes(t)
        return _to(self._publish(t)[:, :n], t.device).view(t.dtype).view(self.world, *t.shape)

    def fits_parts(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> bool:
        """Whether every rank's part (`shapes`, known alike on every rank) fits: the same answer everywhere."""
        return device.type in _DEVICES and max(math.prod(s) for s in shapes) * dtype.itemsize <= self.capacity

    def all_gather_views(self, t: Tensor, shapes: list[tuple[int, ...]], counted: int | None = None) -> list[Tensor]:
        """Every rank's tensor (rank r's of `shapes[r]`, t's dtype; `t` is this rank's) read in
        place: views of the shared slots, no copy out. They stay valid until this rank's next
        call (no peer can write the slot again before this rank has published that call). For a
        CUDA t, views of one copy of the slots on its device.
        `counted`: the bytes of t that peers read, when not all of it (the meter counts those)."""
        if not self.fits_parts(shapes, t.dtype, t.device):
            raise ValueError(
                f"HostExchange.all_gather_views: parts of up to "
                f"{max(math.prod(s) for s in shapes) * t.element_size()} bytes do not fit the "
                f"{self.capacity}-byte CPU buffer; use the process group for them"
            )
        if tuple(t.shape) != tuple(shapes[self.rank]):
            raise ValueError(
                f"this rank's part has shape {tuple(t.shape)}, but shapes[{self.rank}] is {shapes[self.rank]}"
            )
        slots = self._publish(t, counted)
        if _copied(t.device):
            slots = _to(slots[:, : max(math.prod(s) for s in shapes) * t.element_size()], t.device)
        return [
            slots[r, : math.prod(shape) * t.element_size()].view(t.dtype).view(shape) for r, shape in enumerate(shapes)
        ]

    def all_gather_bytes(self, data: bytes) -> list[bytes] | None:
        """Every rank's bytes (any lengths), in rank order; None on every rank alike when the
        longest does not fit: the caller then uses the process group."""
        sizes = self.all_gather(torch.tensor([len(data)], dtype=torch.int64)).flatten().tolist()
        if max(sizes) > self.capacity:
            return None
        buf = torch.zeros(max(sizes), dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = self.all_gather(buf)
        return [parts[r, :n].numpy().tobytes() for r, n in enumerate(sizes)]

    def _publish(self, t: Tensor, counted: int | None = None) -> Tensor:
        """Write t into this call's slot, raise the flag, wait for every peer's: the slots [W, capacity]."""
        n = nbytes(t)
        self._calls += 1
        slots = self._slots[self._calls % 2]
        slots[self.rank, :n].view(t.dtype).view(t.shape).copy_(t)
        self._flags[self.rank, 0] = self._calls  # published after the data (see the module note)
        STATS.add("host_all_gather", n if counted is None else counted)  # written once; peers read it
        self._wait_for_peers()
        return slots

    def _wait_for_peers(self) -> None:
        column = self._flags[:, 0]
        checks, start = 0, None
        while min(column.tolist()) < self._calls:
            checks += 1
            if checks <= _SPINS:
                continue
            now = time.monotonic()
            if start is None:
                start = now
            if now - start < _YIELD_S:
                os.sched_yield()  # ranks may outnumber cores: let the one we wait for run
                continue
            late = [r for r, c in enumerate(column.tolist()) if c < self._calls]
            dead = [r for r in late if not _alive(int(self._flags[r, 1]))]
            if dead:  # same host, so a peer's pid tells whether it still runs
                raise RuntimeError(
                    f"HostExchange: rank(s) {dead} of this host's group exited mid-step; "
                    "the whole group has to be restarted"
                )
            if now - start > self._timeout_s:
                raise RuntimeError(
                    f"HostExchange: rank(s) {late} of this host's group wrote nothing for "
                    f"{self._timeout_s:.0f} s: a peer died or is stuck; the whole group has to be restarted"
                )
            time.sleep(_SLEEP_S)


# where the gathered tensors may live: the host's own, or a GPU's copied through it
_DEVICES = ("cpu", "cuda")


def _copied(device: torch.device) -> bool:
    """Whether gathered parts go to `device` as a copy (a GPU's), not as views of the shared slots."""
    return device.type != "cpu"


def _to(slots: Tensor, device: torch.device) -> Tensor:
    """A copy of shared slots on `device` (the host's: a private copy, peers write the slots again)."""
    return slots.to(device, copy=True).contiguous() if _copied(device) else slots.clone()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_buffer(size: int, token: str) -> str | None:
    """A folder holding the token and a zeroed buffer of `size` bytes (every flag at call 0),
    its memory reserved up front: a full /dev/shm is a clean None here, not a SIGBUS later."""
    if not os.path.isdir("/dev/shm"):  # memory that is this host's alone (a shared /tmp could span hosts)
        return None
    folder = tempfile.mkdtemp(prefix="seqpar-exchange-", dir="/dev/shm")
    try:
        with open(os.path.join(folder, "token"), "w") as f:
            f.write(token)
        fd = os.open(os.path.join(folder, "buffer"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return folder


def _reads_token(folder: str | None, token: str) -> bool:
    if folder is None:
        return False
    try:
        with open(os.path.join(folder, "token")) as f:
            return f.read() == token
    except OSError:
        return False
