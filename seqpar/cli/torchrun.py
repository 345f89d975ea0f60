"""One bootstrap for every command run under torchrun (one process per rank).

Rank 0 is the driver: it runs the command (`drive`) while the other ranks run its model
steps until it stops them. Start-up checks are agreed on by every rank before any loads a
model, so a failure on one rank becomes one error from rank 0, never a hang.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from seqpar.cli.errors import fail
from seqpar.engine.args import engine_config
from seqpar.engine.config import EngineConfig

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def run_under_torchrun(
    args: argparse.Namespace,
    drive: Callable[[EngineConfig, Any], int],
    check_args: Callable[[], None] = lambda: None,
    prepare: Callable[[EngineConfig], Any] = lambda config: None,
) -> int:
    """This process's part of a torchrun job.

    `check_args` checks argv alone (every rank reaches the same verdict; rank 0 says it);
    `prepare` runs on rank 0 with what may differ between machines (a prompt file, the
    tokenizer) and its result goes to `drive(config, prepared)` on rank 0.
    """
    import torch
    import torch.distributed as dist

    from seqpar.comm.launch import agree_on_errors, join_group
    from seqpar.engine.executor import run_rank_steps
    from seqpar.engine.llm_engine import kv_blocks_per_rank
    from seqpar.model import load_config

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        config = engine_config(args, world)
        check_args()
    except ValueError as e:
        return fail(e) if rank == 0 else 2
    torch.set_num_threads(config.threads_per_rank)
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    join_group(config.device, local_rank, local_world, config.step_timeout_s)  # gloo, or NCCL
    ended = False  # this rank reached the end of its part in order (every rank does alike)
    try:
        error, prepared, blocks = None, None, 0
        try:
            blocks = kv_blocks_per_rank(config, load_config(config.model), local=False)
            if rank == 0:
                prepared = prepare(config)
        except ValueError as e:
            error = f"rank {rank}: {e}" if rank else str(e)
        failed = agree_on_errors(error)
        if failed:
            return fail(failed[0]) if rank == 0 else 2
        if rank != 0:
            try:
                # until rank 0 stops the engine; False: some rank failed to start (rank 0 reports it)
                started = run_rank_steps(config, blocks)
                ended = True
                return 0 if started else 2
            except Exception as e:  # a failed step; rank 0 sees this rank gone
                return fail(f"rank {rank}: {type(e).__name__}: {e}")
        rc = drive(config, prepared)
        ended = True
        return rc
    finally:
        if ended:
            # Every rank past its last message before any closes its connections: rank 0 leaving
            # while a peer still read the stop message aborted rank 0 at exit now and then
            # ("terminate called without an active exception") and left the peer waiting.
            dist.barrier()
        dist.destroy_process_group()
