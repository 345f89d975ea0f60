"""Start W ranks as fresh processes on this machine: the one launcher of the engine,
the benchmarks and the tests. Ranks join a gloo group (CPU tensors) or, on GPUs, a NCCL
group (`join_group`, also what torchrun's processes call); ranks that outnumber their host's
GPUs share them and join a gloo group, their CUDA tensors staged through host memory
(`gpu_placement`: NCCL refuses two ranks on one GPU).

`start_ranks` spawns `target(rank, world, port, *args_of(rank))` in W daemonic processes
(they die with the parent); each calls `init_local_rank` to join the group and set its
threads. `run_ranks` is the one-shot form for tests: run a function on every rank and
collect the results, with a hard timeout so a hang (a collective some rank never joins)
becomes an error instead of blocking.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(
    target: Callable[..., None],
    world: int,
    args_of: Callable[[int], tuple] = lambda rank: (),
    name: str = "seqpar-rank",
) -> list[BaseProcess]:
    """Spawn `target(rank, world, port, *args_of(rank))` for every rank; rank 0 listens on `port`.

    Spawned, not forked: a rank starts with clean thread pools and no copy of the parent's state.
    Queues and pipes handed to the ranks come from `mp.get_context("spawn")` too.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=target, args=(r, world, port, *args_of(r)), name=f"{name}{r}", daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def gpu_placement(local_rank: int, local_world: int, gpus: int) -> tuple[str, int]:
    """(backend, GPU) of local rank `local_rank` of `local_world` on a host with `gpus` GPUs.

    One GPU per rank: NCCL, GPU `local_rank`. More ranks than GPUs: they share the GPUs round-robin
    and join a gloo group (NCCL refuses two ranks on one device); the collectives stage CUDA tensors
    through host memory (`collectives.staged`, `shm.HostExchange`). Every rank of a host decides alike.
    """
    if gpus < 1:
        raise RuntimeError("device='cuda' but this host shows no GPU; use device='cpu'")
    if not 0 <= local_rank < local_world:
        raise ValueError(f"local rank {local_rank} is not one of the host's {local_world} ranks")
    if local_world <= gpus:
        return "nccl", local_rank
    return "gloo", local_rank % gpus


def join_group(
    device: str = "cpu", local_rank: int = 0, local_world: int = 1, timeout_s: float | None = None, **init: Any
) -> None:
    """Join the default process group: gloo for CPU tensors, NCCL for CUDA ones, gloo again for ranks that
    share a GPU (`gpu_placement`; `init`: init_process_group's rendezvous arguments; none under
    torchrun, which sets them in the environment).

    On cuda the process is first pinned to its GPU: NCCL's collectives, and the object collectives
    that pickle through it (broadcast_object_list, gather_object), use the current device.
    """
    backend = "gloo"
    if device == "cuda":
        backend, gpu = gpu_placement(local_rank, local_world, torch.cuda.device_count())
        torch.cuda.set_device(gpu)
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, **init, **timeout)


def shares_gpu(device: str) -> bool:
    """Whether this rank's group moves its CUDA tensors through the host (ranks sharing a GPU)."""
    return device == "cuda" and dist.get_backend() == "gloo"


def init_local_rank(
    rank: int,
    world: int,
    port: int,
    threads: int | None = None,
    timeout_s: float | None = None,
    device: str = "cpu",
) -> None:
    """In a started rank: `threads` threads (default cores / W), then join the group on 127.0.0.1:`port`."""
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    join_group(device, rank, world, timeout_s, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def stop_ranks(procs: list[BaseProcess], grace_s: float = 10.0) -> None:
    """Wait up to `grace_s` for each rank to exit by itself, then kill what is left."""
    for p in procs:
        p.join(timeout=grace_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _entry(rank: int, world: int, port: int, fn: Callable, queue: Any, args: tuple, threads: int | None) -> None:
    try:
        init_local_rank(rank, world, port, threads)
        result = fn(rank, world, *args)
        dist.barrier()
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # the result is in the pipe before teardown, which gloo may crash
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 180.0, threads: int | None = None) -> list[Any]:
    """fn(rank, world, *args) on each rank; returns the W results, or raises with the first traceback."""
    queue = mp.get_context("spawn").Queue()
    procs = start_ranks(_entry, world, lambda rank: (fn, queue, args, threads))
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    except queue_mod.Empty:
        raise AssertionError(f"ranks timed out after {timeout}s (a hang?); finished: {sorted(results)}") from None
    finally:
        stop_ranks(procs)
    return [results[r] for r in range(world)]


def agree_on_errors(error: str | None) -> list[str]:
    """Every rank says whether its part failed (`error`) and learns every rank's failures, so a rank
    whose peer failed stops instead of waiting forever in a later collective."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [e for e in errors if e]
