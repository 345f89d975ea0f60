"""Configuration checks that need the model's shape, run in the driver before any rank starts,
so an impossible configuration is an error that names the fix, never a hung rank."""

from __future__ import annotations

import os

from seqpar.engine.config import EngineConfig
from seqpar.model import ModelConfig

# The local launcher runs every rank on this machine; beyond a few ranks per core
# each rank gets too small a slice of a core to be worth a process.
RANKS_PER_CORE_LIMIT = 4


def check_parallelism(config: EngineConfig, mc: ModelConfig, local: bool = True) -> None:
    tp = config.tp_size
    cores = os.cpu_count() or 1
    if local and config.world_size > max(8, RANKS_PER_CORE_LIMIT * cores):
        raise ValueError(
            f"sp_size x tp_size = {config.world_size} ranks is more than this machine allows "
            f"({max(8, RANKS_PER_CORE_LIMIT * cores)} for {cores} cores); use fewer ranks, or launch across "
            "machines with torchrun"
        )
    if mc.num_heads % tp or mc.num_kv_heads % tp:
        raise ValueError(
            f"tp_size={tp} must divide the model's {mc.num_heads} q heads and {mc.num_kv_heads} kv heads; "
            f"use a tp_size dividing {mc.num_kv_heads}"
        )
