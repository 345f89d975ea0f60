"""Engine configuration: one frozen object, validated once, shared by the driver and every rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from seqpar.engine.kv_cache import SHARD_SCHEMES, Placement
from seqpar.strategies.decode import MERGES as DECODE_MERGES
from seqpar.strategies.over_cache import CACHE_STRATEGIES

# ring = pass-KV; auto = per step the cheapest of them by the cost model over this machine's profile
# (seqpar.engine.auto_strategy; `seqpar tune` measures the profile).
PREFILL_STRATEGIES = (*CACHE_STRATEGIES, "auto")
# In the attention library (seqpar.sp_attention) only: they attend whole prompts, not chunks over a cache.
LIBRARY_ONLY = ("ulysses", "usp", "head_sharded")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# auto: the checkpoint's dtype where this machine computes it fast, else float32
# (seqpar.kernels.precision); the driver resolves it once and the ranks get the result.
DTYPE_CHOICES = ("auto", *DTYPES)
# cpu: gloo, every path tested. cuda: NCCL, one GPU per rank; written but not yet run on a GPU
# (scripts/gpu_check.sh is the check that would say it works).
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"
    sp_size: int = 1
    tp_size: int = 1
    # prefill attention across SP ranks (over their KV caches); auto: per step the cheapest by the cost
    # model (it picked within 10% of the fastest at 94% of the validation grid, docs/benchmarks.md)
    strategy: str = "auto"
    decode_merge: str = "allgather"  # how partial decode attention is merged across SP ranks
    scheme: str = "zigzag"  # how positions are sharded across SP ranks: zigzag or striped over shard units
    shard_blocks: int = 16  # KV blocks per shard unit: consecutive positions one SP rank holds
    num_threads: int | None = None  # per rank; default: cores split evenly over ranks
    dtype: str = "auto"
    block_size: int = 16
    kv_cache_gb: float = 1.0  # per rank
    max_model_len: int | None = None  # default: the model's context
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # tokens per step across the SP group (chunked prefill)
    long_prefill_token_threshold: int | None = None  # a prefill chunk's cap while others wait; default half the budget
    enable_prefix_caching: bool = True
    seed: int = 0
    step_timeout_s: float = 1800.0  # a step that takes longer means a wedged worker
    decode_split: bool = True  # decode-only steps split the MLP over the SP ranks (tp_size 1)
    shared_memory: bool = True  # decode merges, pass-KV and step results through shared memory on one host
    # Replaces the model's RoPE scaling (HF's rope_scaling dict, as vLLM's --rope-scaling), e.g.
    # {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 8192}; the context grows by the factor.
    rope_scaling: dict[str, Any] | None = None
    # Where every rank keeps its model and KV cache; cuda: NCCL, rank i on GPU i of its host, no shared memory.
    device: str = "cpu"

    def __post_init__(self) -> None:
        def choice(name: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(options)}")

        if self.strategy in LIBRARY_ONLY:
            raise ValueError(
                f"strategy={self.strategy!r} attends whole prompts; the engine prefills in chunks over the "
                f"sharded KV cache (prefix caching, chunked prefill), where {', '.join(PREFILL_STRATEGIES)} apply. "
                f"Use one of those, or seqpar.sp_attention(..., strategy={self.strategy!r}) on whole sequences"
            )
        choice("strategy", self.strategy, PREFILL_STRATEGIES)
        choice("decode_merge", self.decode_merge, DECODE_MERGES)
        choice("scheme", self.scheme, SHARD_SCHEMES)
        choice("dtype", self.dtype, DTYPE_CHOICES)
        choice("device", self.device, DEVICES)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device='cuda' but torch.cuda.is_available() is False here (a CPU-only torch build, or no GPU "
                "visible); use device='cpu' (gloo, the tested path), or run on a machine with a GPU and a CUDA "
                "build of torch"
            )
        for name in ("sp_size", "tp_size", "block_size", "shard_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(f"long_prefill_token_threshold must be >= 1, got {self.long_prefill_token_threshold}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(
                f"rope_scaling must be a dict like {{'rope_type': 'yarn', 'factor': 4}}, got {self.rope_scaling!r}"
            )
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")

    def placement(self) -> Placement:
        return Placement(self.sp_size, self.block_size, self.shard_blocks, self.scheme)

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
        if self.dtype == "auto":
            raise ValueError("dtype='auto' is resolved before use: seqpar.engine.dtype.resolve_dtype(config)")
        return DTYPES[self.dtype]
