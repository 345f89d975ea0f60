"""Run a function on W gloo ranks in fresh processes on this machine, with a hard timeout.

Used by tests and benchmarks: a hang (a collective some rank never joins) becomes
an error instead of blocking. Each rank gets cores / W threads (or `threads`).
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, queue: Any, args: tuple, threads: int | None) -> None:
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
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
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args, threads), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    except Exception as exc:
        if exc.__class__.__name__ == "Empty":
            raise AssertionError(f"ranks timed out after {timeout}s (a hang?); finished: {sorted(results)}") from None
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
