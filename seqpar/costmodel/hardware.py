"""Hardware constants, with where each comes from.

Public sources:
- [H100] NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16 dense 989 TFLOP/s (the sheet
  prints 1,979 "with sparsity"), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s per GPU (both
  directions together: 450 GB/s each way).
- [H200] NVIDIA H200 Tensor Core GPU datasheet, SXM column: the same Hopper compute (BF16 dense
  989 TFLOP/s) and NVLink 900 GB/s, with 141 GB HBM3e at 4.8 TB/s.
- [DGX] NVIDIA DGX H100 / H200 user guide: eight single-port ConnectX-7 400 Gb/s adapters, one per
  GPU: 50 GB/s per GPU each way between nodes. Meta's 2411.01783 H100 hosts likewise give each
  GPU a 400 Gb/s RDMA NIC.
- [FA3] FlashAttention-3 (arXiv 2407.08608): BF16/FP16 forward attention "up to 740 TFLOP/s (75%
  utilization)" on H100: the attention kernel's share of peak on long sequences.

Assumed (no datasheet states them): per-message latency of a collective step, 2 us over NVLink
and 10 us over the network (small-message NCCL figures are of this order). They matter only for
short contexts and decode.

Calibrated: `gemm_efficiency`, the one fitted factor (see `seqpar.costmodel.calibrate` and
docs/benchmarks.md): the share of peak the rest of prefill (linear layers, elementwise work, FP8
quantisation or whatever the measured system did) reaches. Fitted on ONE published point.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense, per device, at the compute dtype
    attention_efficiency: float  # share of peak the attention kernel reaches on long sequences
    gemm_efficiency: float  # share of peak for everything else in prefill: the calibrated factor
    memory_bytes: float  # per device
    memory_bandwidth: float  # bytes/s per device
    intra_bandwidth: float  # bytes/s per device each way, inside a node (NVLink)
    intra_latency: float  # s per collective step inside a node
    inter_bandwidth: float  # bytes/s per device each way, between nodes (its NIC)
    inter_latency: float  # s per collective step between nodes
    dtype_bytes: int = 2  # activations and KV cache (bf16)
    memory_fraction: float = 0.9  # of memory_bytes for weights and KV; the rest: activations, workspace

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"hardware {self.name!r}: {f.name} must be a positive number, got {value!r}")
        for name in ("attention_efficiency", "gemm_efficiency", "memory_fraction"):
            if getattr(self, name) > 1:
                raise ValueError(
                    f"hardware {self.name!r}: {name} is a share of peak, at most 1, got {getattr(self, name)}"
                )

    @classmethod
    def from_json(cls, path: str | Path) -> Hardware:
        """A profile file: one JSON object with this class's fields (what `seqpar tune` would write)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read hardware profile {str(path)!r}: {e}") from e
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names) if isinstance(raw, dict) else []
        missing = (
            sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in raw)
            if isinstance(raw, dict)
            else []
        )
        if not isinstance(raw, dict) or unknown or missing:
            raise ValueError(
                f"hardware profile {str(path)!r} must be a JSON object with the fields {sorted(names)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# gemm_efficiency: calibrated on Meta's Llama 3 405B 128K-token prefill on 16 H100 nodes (3.8 s),
# see calibrate.py; H200 has the same compute, so the same software share of peak is assumed.
H100_GEMM_EFFICIENCY = 0.299

H100 = Hardware(
    name="h100",
    peak_flops=989e12,
    attention_efficiency=0.75,
    gemm_efficiency=H100_GEMM_EFFICIENCY,
    memory_bytes=80 * GB,
    memory_bandwidth=3.35e12,
    intra_bandwidth=450 * GB,
    intra_latency=2e-6,
    inter_bandwidth=50 * GB,
    inter_latency=10e-6,
)
H200 = Hardware(
    name="h200",
    peak_flops=989e12,
    attention_efficiency=0.75,
    gemm_efficiency=H100_GEMM_EFFICIENCY,
    memory_bytes=141 * GB,
    memory_bandwidth=4.8e12,
    intra_bandwidth=450 * GB,
    intra_latency=2e-6,
    inter_bandwidth=50 * GB,
    inter_latency=10e-6,
)
PRESETS = {"h100": H100, "h200": H200}


def resolve_hardware(name_or_path: str) -> Hardware:
    """A preset name (h100, h200) or a JSON profile file."""
    if name_or_path.lower() in PRESETS:
        return PRESETS[name_or_path.lower()]
    if Path(name_or_path).is_file():
        return Hardware.from_json(name_or_path)
    raise ValueError(f"--hardware {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON profile file")
