"""Engine configuration: one frozen object, validated once, shared by the driver and every rank."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

PREFILL_STRATEGIES = ("ring", "pass_q", "allgather", "ulysses", "usp", "head_sharded", "auto")
DECODE_MERGES = ("allgather", "alltoall", "tree")
PLACEMENTS = ("round_robin", "least_loaded")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"
    sp_size: int = 1
    tp_size: int = 1
    strategy: str = "ring"  # prefill attention across SP ranks
    decode_merge: str = "allgather"  # how partial decode attention is merged across SP ranks
    placement: str = "round_robin"  # which SP rank caches each decoded token
    scheme: str = "zigzag"  # how prompts are sharded across SP ranks
    ulysses_degree: int | None = None  # for strategy="usp"
    num_threads: int | None = None  # per rank; default: cores split evenly over ranks
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_gb: float = 1.0  # per rank
    max_model_len: int | None = None  # default: the model's context
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1 << 20
    seed: int = 0
    step_timeout_s: float = 1800.0  # a step that takes longer means a wedged worker
    shared_memory: bool = True  # decode merges and step results through shared memory between ranks on one host

    def __post_init__(self) -> None:
        def choice(name: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(options)}")

        choice("strategy", self.strategy, PREFILL_STRATEGIES)
        choice("decode_merge", self.decode_merge, DECODE_MERGES)
        choice("placement", self.placement, PLACEMENTS)
        choice("scheme", self.scheme, ("contiguous", "zigzag", "striped"))
        choice("dtype", self.dtype, tuple(DTYPES))
        for name in ("sp_size", "tp_size", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.strategy == "usp":
            if self.ulysses_degree is None or self.sp_size % self.ulysses_degree:
                raise ValueError(f"strategy='usp' needs ulysses_degree dividing sp_size={self.sp_size}, got {self.ulysses_degree}")
        if self.strategy == "head_sharded" and self.tp_size != 1:
            raise ValueError("strategy='head_sharded' is the seed's coupled layout: it shards heads over the SP group itself; use tp_size=1")

    @property
    def world_size(self) -> int:
        return self.sp_size * self.tp_size

    @property
    def threads_per_rank(self) -> int:
        """Cores split evenly over the ranks on this machine (torchrun says how many: LOCAL_WORLD_SIZE)."""
        here = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        return self.num_threads or max(1, (os.cpu_count() or 1) // here)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
