"""Engine configuration: one frozen object, validated once, shared by the driver and every rank.

Every option is declared once, here: its default, its help text and its choices ride on the
field (`opt(...)`), and `seqpar.engine.args` generates the command-line flags of every
command and benchmark from these fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqpar.engine.placement import SCHEME_ALIASES, SHARD_SCHEMES, Placement
from seqpar.kernels.backends import NAMES as BACKEND_NAMES
from seqpar.kernels.backends import named
from seqpar.model.loader import DEFAULT_MODEL
from seqpar.strategies.decode import MERGES as DECODE_MERGES
from seqpar.strategies.registry import over_cache_names, strategies, where_it_runs

# The registered strategies that run over the sharded cache (ring = pass-KV, pass_q, allgather), and
# auto: per step the cheapest of them by the cost model over this machine's profile
# (seqpar.engine.auto_strategy; `seqpar tune` measures the profile).
PREFILL_STRATEGIES = (*over_cache_names(), "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# auto: the checkpoint's dtype where this machine computes it fast, else float32
# (seqpar.kernels.precision); the driver resolves it once and the ranks get the result.
DTYPE_CHOICES = ("auto", *DTYPES)
# cpu: gloo, every path tested. cuda: NCCL with one GPU per rank; ranks that outnumber the GPUs share
# them over gloo (comm/launch.py's gpu_placement); tests/test_gpu.py passed on one GPU at SP 1.
DEVICES = ("cpu", "cuda")
ATTENTION_BACKENDS = ("auto", *BACKEND_NAMES)  # seqpar.kernels.backends


def opt(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None, choices: Any = None) -> Any:
    """A config field with what its command-line flag needs: help text ("%(default)s" allowed),
    the flag's name when it is not `--field-name`, a metavar, and the allowed values."""
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def _check_store_dir(path: str) -> None:
    """Create kv_store_dir if needed; a clear error where it cannot be a writable directory."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"kv_store_dir={path!r} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"kv_store_dir={path!r} cannot be created: {e}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"kv_store_dir={path!r} is not writable by this user")


@dataclass(frozen=True)
class EngineConfig:
    model: str = opt(DEFAULT_MODEL, "known model name, GGUF file or HF directory (default: %(default)s)")
    sp_size: int = opt(1, "sequence-parallel ranks (default: 1; under torchrun WORLD_SIZE / tp)", flag="--sp")
    tp_size: int = opt(1, "tensor-parallel ranks per SP rank (default: %(default)s)", flag="--tp")
    # auto picked within 10% of the fastest at 94% of the validation grid (docs/benchmarks.md)
    strategy: str = opt(
        "auto",
        "prefill attention across SP ranks, over their KV caches; auto: each step the cheapest by the cost "
        "model over this machine's profile (seqpar tune) (default: %(default)s)",
        choices=PREFILL_STRATEGIES,
    )
    decode_merge: str = opt(
        "allgather", "how decode merges partial attention across SP ranks (default: %(default)s)", choices=DECODE_MERGES
    )
    scheme: str = opt(
        "snake",
        "how positions are spread over SP ranks, in units of --shard-blocks KV blocks: snake (ranks 0..W-1, "
        "then W-1..0, again; zigzag: its old name) or striped (default: %(default)s)",
        choices=(*SHARD_SCHEMES, *SCHEME_ALIASES),
    )
    shard_blocks: int = opt(16, "KV blocks per shard unit: consecutive positions one SP rank holds (default: 16)")
    num_threads: int | None = opt(None, "threads per rank (default: cores / ranks)", metavar="T")
    dtype: str = opt(
        "auto",
        "weights and activations; auto: the checkpoint's dtype (GGUF: bfloat16) where this machine computes it "
        "fast, else float32, decided at start-up (default: %(default)s)",
        choices=DTYPE_CHOICES,
    )
    block_size: int = opt(16, "tokens per KV block (default: %(default)s)")
    kv_cache_gb: float = opt(1.0, "KV cache per rank, GiB (default: %(default)s)", metavar="G")
    max_model_len: int | None = opt(
        None, "tokens per sequence at most, prompt + output (default: the model's context)", metavar="L"
    )
    max_num_seqs: int = opt(64, "requests in one batch at most (default: %(default)s)")
    # None: a size that suits the device. A GPU's GEMMs and flash kernel want many rows (at 32K an 8B model
    # prefilled in 8K chunks ran within 2% of one chunk on an H200); 2,048 keeps a CPU's steps short.
    max_num_batched_tokens: int | None = opt(
        None,
        "tokens per step across the SP group; longer prompts prefill in chunks (default: 2048 on cpu, 8192 on cuda)",
    )
    long_prefill_token_threshold: int | None = opt(
        None, "a prefill chunk's cap while other requests wait (default: half of --max-num-batched-tokens)"
    )
    enable_prefix_caching: bool = opt(True, "reuse the KV of cached prompt prefixes (default: on)")
    seed: int = opt(0, "the engine's sampling seed for requests without their own (default: %(default)s)")
    step_timeout_s: float = opt(
        1800.0, "seconds a step may take before its rank counts as wedged (default: 1800)", metavar="S"
    )
    decode_split: bool = opt(True, "decode-only steps split the MLP over the SP ranks (tp 1) (default: on)")
    packed_decode_weights: bool = opt(
        True,
        "decode-only steps read the linear weights from a private copy in oneDNN's blocked layout (CPU, "
        "fp32/bf16, tp 1): the linear layers ~2x faster per row, at the price of a second copy of those "
        "weights per rank (of its slice under --decode-split) (default: on where every rank's copies fit a "
        "quarter of the host's memory; --no-packed-decode-weights keeps one copy per host)",
    )
    enforce_eager: bool = opt(
        False,
        "run everything eagerly; otherwise long steps' per-token work (norms, projections, RoPE, MLP of "
        "each full 1,024-row tile on CPU, of whole chunks of 1,024 rows or more on cuda) runs through "
        "torch.compile, compiled at start-up and cached on disk (tp 1, not with "
        "--enable-deterministic-inference; an eager fallback says why), and on cuda at "
        "decode steps replay CUDA graphs, one per batch-size bucket (at SP > 1 in pieces between "
        "collectives; tp 1) (default: off)",
    )
    shared_memory: bool = opt(
        True,
        "decode merges, pass-KV and pass-Q between ranks on one host through shared memory (default: on; "
        "--no-shared-memory sends everything over the process group, as between hosts)",
    )
    # HF's rope_scaling dict, as vLLM's --rope-scaling; the context grows by the factor.
    rope_scaling: dict[str, Any] | None = opt(
        None,
        'replace the model\'s RoPE scaling, e.g. \'{"rope_type":"yarn","factor":4,'
        '"original_max_position_embeddings":8192}\' (the context grows by the factor)',
        metavar="JSON",
    )
    enable_deterministic_inference: bool = opt(
        False,
        "a request's tokens and logprobs are the same bits at any SP degree, chunk size and batch, with "
        "any strategy and decode merge, from a cached prefix or not (fp32 and bf16; cpu, tp 1); unseeded "
        "requests sample as if seeded with --seed (default: off)",
    )
    kv_store_dir: str | None = opt(
        None,
        "keep full KV blocks as files in this directory (created if missing), so a prompt prefilled once is "
        "loaded, not recomputed, after a restart; files are per model, dtype, layout and rank, and checked "
        "when read (default: off)",
        metavar="DIR",
    )
    kv_store_gb: float = opt(
        16.0, "the KV store's size bound, GiB; least recently used files deleted first (default: %(default)s)"
    )
    kv_store_host_gb: float = opt(
        0.0,
        "keep full KV blocks in this much host memory too (GiB over all ranks; the tier a GPU rank offloads "
        "to), looked up before --kv-store-dir and kept until the next restart; least recently used out "
        "first (default: off)",
    )
    attention_backend: str = opt(
        "auto",
        "attention kernels (SGLang's --attention-backend): auto (the device's own), cpu (PyTorch's CPU flash "
        "kernel), triton (cuda: flash blocks, the paged Triton decode kernel, decode steps as CUDA graphs), "
        "torch (plain torch in fp32, cpu or cuda: a slow reference for checking) (default: %(default)s)",
        choices=ATTENTION_BACKENDS,
    )
    device: str = opt(
        "cpu",
        "where ranks keep the model and KV cache: cpu (gloo) or cuda (NCCL, rank i on GPU i of its host; "
        "more ranks than GPUs share them round-robin over gloo, through host memory: a check of SP on one "
        "GPU, not a way to speed it up) (default: %(default)s)",
        choices=DEVICES,
    )

    def __post_init__(self) -> None:
        if self.scheme in SCHEME_ALIASES:  # the old name: one name from here on
            object.__setattr__(self, "scheme", SCHEME_ALIASES[self.scheme])
        if self.strategy in strategies() and self.strategy not in PREFILL_STRATEGIES:
            raise ValueError(
                f"strategy={self.strategy!r} attends whole prompts; the engine prefills in chunks over the "
                f"sharded KV cache (prefix caching, chunked prefill), where {', '.join(PREFILL_STRATEGIES)} apply. "
                f"Use one of those, or {where_it_runs(self.strategy)}"
            )
        for f in dataclasses.fields(self):
            options = f.metadata.get("choices")
            if options is not None and getattr(self, f.name) not in options:
                raise ValueError(
                    f"{f.name}={getattr(self, f.name)!r} is not supported; choose one of {', '.join(options)}"
                )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device='cuda' but torch.cuda.is_available() is False here (a CPU-only torch build, or no GPU "
                "visible); use device='cpu' (gloo), or run on a machine with a GPU and a CUDA build of "
                "torch (tested on one GPU; see the README's GPU section)"
            )
        if self.max_num_batched_tokens is None:
            object.__setattr__(self, "max_num_batched_tokens", 8192 if self.device == "cuda" else 2048)
        for name in ("sp_size", "tp_size", "block_size", "shard_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("long_prefill_token_threshold", "num_threads", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(
                f"rope_scaling must be a dict like {{'rope_type': 'yarn', 'factor': 4}}, got {self.rope_scaling!r}"
            )
        if self.enable_deterministic_inference and (self.tp_size != 1 or self.device != "cpu"):
            raise ValueError(
                f"enable_deterministic_inference needs tp_size=1 and device='cpu' (got tp_size={self.tp_size}, "
                f"device={self.device!r}): tensor parallelism sums partial products across ranks, another "
                "order for every TP degree, and the canonical attention order is built on the CPU flash kernel"
            )
        named(self.attention_backend, self.device)  # one that runs on the device
        if self.enable_deterministic_inference and self.attention_backend not in ("auto", "cpu"):
            raise ValueError(
                f"enable_deterministic_inference computes attention in its own canonical order over the CPU flash "
                f"kernel; attention_backend={self.attention_backend!r} cannot go with it: leave it 'auto'"
            )
        if self.enable_deterministic_inference and self.dtype == "float16":
            raise ValueError(
                "enable_deterministic_inference runs in float32 or bfloat16, not float16 (its row-invariant "
                "GEMMs are oneDNN's, which computes float16 only with AVX512-FP16, and were measured in those two "
                "dtypes only); use dtype='bfloat16' or 'float32'"
            )
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.kv_store_gb <= 0:
            raise ValueError(f"kv_store_gb must be > 0, got {self.kv_store_gb}")
        if self.kv_store_host_gb < 0:
            raise ValueError(f"kv_store_host_gb must be >= 0 (0: off), got {self.kv_store_host_gb}")
        if self.kv_store_host_gb > 0 and not self.enable_prefix_caching:
            raise ValueError(
                "kv_store_host_gb needs enable_prefix_caching: stored blocks are found by their prefix hash"
            )
        if self.kv_store_dir is not None:
            if not self.enable_prefix_caching:
                raise ValueError(
                    "kv_store_dir needs enable_prefix_caching: stored blocks are found by their prefix hash"
                )
            _check_store_dir(self.kv_store_dir)
        if self.step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")

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
