"""`dtype="auto"` made concrete, once, before any rank loads weights.

Every rank must compute in the same dtype (their partial results meet in the merges), so the
driver resolves `auto` and hands the ranks a config that names the dtype. Under torchrun each
process resolves it (from CPU flags, or the cached measurement), and the ranks check that they
agree before serving (`executor._init_worker`).
"""

from __future__ import annotations

import dataclasses

from seqpar.engine.config import EngineConfig
from seqpar.kernels.precision import choose_dtype
from seqpar.model import checkpoint_dtype


def resolve_dtype(config: EngineConfig) -> tuple[EngineConfig, str]:
    """(config with a concrete dtype, why it was chosen; '' when it was given)."""
    if config.dtype != "auto":
        return config, ""
    dtype, why = choose_dtype(checkpoint_dtype(config.model), config.device)
    if why == "checkpoint float32":
        why = ""  # nothing to choose between: not worth a line at start-up
    return dataclasses.replace(config, dtype=str(dtype).removeprefix("torch.")), why
