"""Rank processes and the control channel to them.

The driver (the user's process) is not a rank. `LocalExecutor` starts the W ranks
on this machine; it talks to rank 0 over a pipe, and rank 0 broadcasts each
message to the others over torch.distributed, so every rank runs the same steps.
Under torchrun, rank 0 *is* the driver (`TorchrunExecutor`) and the other ranks
run `serve`. A rank that dies or errs fails the step at once with its traceback;
leaving the engine (or the interpreter) ends every rank.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from seqpar.comm.launch import init_local_rank, start_ranks, stop_ranks
from seqpar.engine.config import EngineConfig
from seqpar.engine.dtype import resolve_dtype
from seqpar.engine.messages import StepResult
from seqpar.engine.worker import Worker

ProgressFn = Callable[[int, int], None]


class EngineDeadError(RuntimeError):
    """A rank failed; the engine's ranks are stopped and it takes no more requests."""


def _init_worker(config: EngineConfig, num_blocks: int, progress: Any) -> tuple[Worker | None, str | None]:
    """Build this rank's worker; every rank learns whether all succeeded (no rank hangs)."""
    worker, error = None, None
    try:
        # A no-op when the driver resolved it; under torchrun each process resolves `auto` itself.
        config, _ = resolve_dtype(config)
        worker = Worker(config, num_blocks, progress)
    except Exception:
        error = f"rank {dist.get_rank()}:\n{traceback.format_exc()}"
    answers: list[tuple[str | None, str]] = [(None, "")] * dist.get_world_size()
    dist.all_gather_object(answers, (error, config.dtype))
    failed = [e for e, _ in answers if e]
    dtypes = {d for _, d in answers}
    if not failed and len(dtypes) > 1:
        failed = [f"the ranks resolved dtype 'auto' differently ({', '.join(sorted(dtypes))}); give dtype explicitly"]
    return worker, "\n".join(failed) if failed else None


def run_steps(worker: Worker, conn: Any = None) -> None:
    """The loop every rank but the driver runs: receive a message, step, reply (rank 0)."""
    while True:
        msg = None
        if conn is not None:
            try:
                msg = conn.recv()
            except EOFError:  # the driver is gone
                msg = None
        box = [msg]
        if dist.get_world_size() > 1:  # one rank: nothing to tell anyone
            dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        try:
            result = worker.execute(box[0])
        except Exception:
            if conn is None:
                raise  # the process exits non-zero; the driver sees a dead rank
            conn.send(("error", f"rank 0:\n{traceback.format_exc()}"))
            continue
        if conn is not None:
            conn.send(("ok", result))


def run_rank_steps(config: EngineConfig, num_blocks: int) -> bool:
    """A torchrun rank other than 0: build the worker, then run rank 0's steps until it stops.

    Returns False when some rank failed to start (rank 0 reports why).
    """
    worker, error = _init_worker(config, num_blocks, None)
    if error is not None:
        return False
    run_steps(worker)
    return True


def _watch_parent(parent_pid: int) -> None:
    """A rank whose driver died exits instead of idling as an orphan."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def _rank_main(
    rank: int, world: int, port: int, config: EngineConfig, num_blocks: int, conn: Any, progress: Any, parent: int
) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    init_local_rank(rank, world, port, config.threads_per_rank, config.step_timeout_s, config.device)
    worker, error = _init_worker(config, num_blocks, progress)
    if conn is not None:
        conn.send(("error", error) if error else ("ok", None))
    if error:
        return
    run_steps(worker, conn)
    dist.destroy_process_group()


class LocalExecutor:
    def __init__(self, config: EngineConfig, num_blocks: int):
        self.config = config
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._progress = ctx.Queue()
        parent = os.getpid()
        self._procs = start_ranks(
            _rank_main,
            config.world_size,
            lambda r: (config, num_blocks, child if r == 0 else None, self._progress if r == 0 else None, parent),
        )
        self.closed = False
        self._wait(None, timeout=600.0)  # ranks load the model; errors come back here

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def call(self, msg: Any, on_progress: ProgressFn | None = None) -> StepResult:
        if self.closed:
            raise EngineDeadError("the engine's ranks are stopped; create a new LLM")
        self._conn.send(msg)
        return self._wait(on_progress, self.config.step_timeout_s)

    def _wait(self, on_progress: ProgressFn | None, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self._conn.poll(0.05):
                status, value = self._conn.recv()
                self._drain(on_progress)
                if status == "error":
                    self.shutdown()
                    raise EngineDeadError(f"a rank failed; the engine is stopped:\n{value}")
                return value
            self._drain(on_progress)
            dead = [(p.name, p.exitcode) for p in self._procs if p.exitcode is not None]
            if dead:
                self.shutdown()
                raise EngineDeadError(
                    f"rank process(es) exited unexpectedly {dead}; requests in flight failed "
                    "and the engine is stopped (see the rank's output above for why)"
                )
            if time.monotonic() > deadline:
                self.shutdown()
                raise EngineDeadError(f"no answer from the ranks within {timeout:.0f}s; the engine is stopped")

    def _drain(self, on_progress: ProgressFn | None) -> None:
        while not self._progress.empty():
            item = self._progress.get_nowait()
            if on_progress is not None:
                on_progress(*item)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        stop_ranks(self._procs)
        self._conn.close()
        self._progress.close()
        self._progress.join_thread()


class TorchrunExecutor:
    """Under torchrun: this process is global rank 0 and the driver; the others `serve`."""

    def __init__(self, config: EngineConfig, num_blocks: int):
        self.config = config
        self._on_progress: ProgressFn | None = None
        worker, error = _init_worker(config, num_blocks, self)
        if error:
            raise EngineDeadError(f"a rank failed to start:\n{error}")
        self.worker = worker
        self.closed = False

    @property
    def pids(self) -> list[int]:
        return [os.getpid()]  # the other ranks run in torchrun's processes, perhaps on other hosts

    def put(self, item: tuple[int, int]) -> None:  # progress, in-process
        if self._on_progress is not None:
            self._on_progress(*item)

    def call(self, msg: Any, on_progress: ProgressFn | None = None) -> StepResult:
        if self.closed:
            raise EngineDeadError("the engine is shut down")
        self._on_progress = on_progress
        if dist.get_world_size() > 1:
            dist.broadcast_object_list([msg], src=0)
        return self.worker.execute(msg)

    def shutdown(self) -> None:
        if not self.closed:
            self.closed = True
            if dist.get_world_size() > 1:
                dist.broadcast_object_list([None], src=0)
