"""The one calibrated factor, and the published points it is checked against.

Meta, "Context Parallelism for Scalable Million-Token Inference" (arXiv 2411.01783): Llama 3 405B
prefill on H100 hosts, 8 GPUs per node with TP 8 inside the node and CP across nodes, ring
pass-KV. `gemm_efficiency` is fitted on ONE of the points (128K tokens on 16 nodes); the others
are predictions. docs/benchmarks.md holds the table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from seqpar.costmodel.hardware import Hardware
from seqpar.costmodel.layouts import Layout
from seqpar.costmodel.predict import predict
from seqpar.model.config import ModelConfig


@dataclass(frozen=True)
class PublishedPoint:
    label: str
    tokens: int
    nodes: int
    ttft_s: float


META_405B_H100 = (
    PublishedPoint("128K tokens, 1 node (TP8)", 128 * 1024, 1, 60.0),
    PublishedPoint("1M tokens, 16 nodes (TP8 x CP16)", 1024 * 1024, 16, 77.0),
    PublishedPoint("128K tokens, 16 nodes (TP8 x CP16)", 128 * 1024, 16, 3.8),
)
CALIBRATION_POINT = META_405B_H100[2]


def point_ttft(mc: ModelConfig, hw: Hardware, point: PublishedPoint) -> float:
    layout = Layout(tp=8, cp=point.nodes, gpus_per_node=8)
    return predict(mc, hw, layout, "ring" if point.nodes > 1 else "local", point.tokens).ttft_s


def calibrate_gemm_efficiency(mc: ModelConfig, hw: Hardware, point: PublishedPoint = CALIBRATION_POINT) -> float:
    """The gemm_efficiency at which `point` is predicted exactly (bisection: TTFT falls as it rises)."""
    lo, hi = 1e-3, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if point_ttft(mc, replace(hw, gemm_efficiency=mid), point) > point.ttft_s:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
