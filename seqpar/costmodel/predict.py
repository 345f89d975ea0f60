"""Predicted prefill (TTFT) and decode time of one long sequence on a layout, and `choose_layout`:
every layout and strategy, and the one to choose (`seqpar plan`).

Model, per layer and rank (a rank = one GPU of a TP x CP layout, holding T_local = T / CP tokens):
- linear: its share of the matmul FLOPs at `peak * gemm_efficiency`;
- TP: two all-reduces of [T_local, hidden] over NVLink (after attention and after the MLP), not
  overlapped with compute (a ring all-reduce: 2 (TP-1)/TP of the bytes, 2 (TP-1) latency steps);
- attention: causal FLOPs / CP (zigzag sharding balances them) at `peak * attention_efficiency`;
- CP communication, exactly the bytes of `formulas` for equal shards, at the CP link's bandwidth
  (the network once the group spans nodes), as each strategy prices it (its `Cost.layout_s`, in
  its own module): ring pass-KV and pass-Q overlap each transfer with the previous block's
  attention (a step costs the larger of the two); pass-Q then returns the partial outputs by
  all-to-all; all-gather and Ulysses wait for their collectives.
Decode of one token: every weight and this rank's KV share read from memory once, plus each
layer's collectives (TP all-reduces, the CP all-gather merge), latency-bound at one token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from seqpar.costmodel import formulas as f
from seqpar.costmodel.hardware import Hardware
from seqpar.costmodel.layouts import Layout, PlanError, enumerate_layouts, strategies_for
from seqpar.model.config import ModelConfig
from seqpar.strategies.pricing import LayoutLayer
from seqpar.strategies.registry import costs

WEIGHT_BYTES = {"bf16": 2, "fp8": 1}  # storage only: matmuls are costed at the hardware's compute dtype


@dataclass(frozen=True)
class Prediction:
    layout: str
    tp: int
    cp: int
    strategy: str
    ttft_s: float
    decode_ms_per_token: float
    kv_bytes_per_rank: int
    max_context_tokens: int  # the longest sequence this layout's memory holds
    fits: bool  # the requested context fits
    linear_s: float  # the parts of ttft_s
    tp_comm_s: float
    attention_s: float
    cp_comm_exposed_s: float  # CP communication not hidden behind attention

    def as_dict(self) -> dict:
        return asdict(self)


def _link(hw: Hardware, layout: Layout) -> tuple[float, float]:
    return (hw.inter_bandwidth, hw.inter_latency) if layout.cp_crosses_nodes else (hw.intra_bandwidth, hw.intra_latency)


def all_reduce_s(nbytes: int, world: int, bandwidth: float, latency: float) -> float:
    return f.all_reduce_bytes(nbytes, world) / bandwidth + 2 * (world - 1) * latency if world > 1 else 0.0


def prefill(mc: ModelConfig, hw: Hardware, layout: Layout, strategy: str, tokens: int) -> dict[str, float]:
    """Seconds per part of a whole-prompt prefill of `tokens` (no cached prefix)."""
    tp, cp, b, d, L = layout.tp, layout.cp, hw.dtype_bytes, mc.head_dim, mc.num_layers
    t_local = -(-tokens // cp)
    hq, hkv = mc.num_heads // tp, f.kv_heads_per_tp_rank(mc, tp)
    linear = f.linear_flops(mc, t_local, logit_rows=1) / tp / (hw.peak_flops * hw.gemm_efficiency)
    tp_comm = 2 * L * all_reduce_s(t_local * mc.hidden_size * b, tp, hw.intra_bandwidth, hw.intra_latency)
    # per layer on average (a sliding-window layer's is T x W, a global one's T^2 / 2)
    attn_layer = f.prefill_attention_flops(mc, tokens) / L / tp / cp / (hw.peak_flops * hw.attention_efficiency)
    if strategy == "local":  # one sequence rank: nothing to exchange
        layer = attn_layer
    else:
        cost = costs().get(strategy)
        if cost is None or cost.layout_s is None:
            raise PlanError(f"unknown strategy {strategy!r}")
        bw, lat = _link(hw, layout)
        layer = cost.layout_s(LayoutLayer(attn_layer, t_local, cp, hq, hkv, d, b, bw, lat))
    return {
        "linear_s": linear,
        "tp_comm_s": tp_comm,
        "attention_s": L * attn_layer,
        "cp_comm_exposed_s": L * (layer - attn_layer),
    }


def decode_s(mc: ModelConfig, hw: Hardware, layout: Layout, context: int, weight_dtype: str = "bf16") -> float:
    """Seconds per output token at `context` tokens: memory-bound reads plus per-layer collectives."""
    tp, cp, b = layout.tp, layout.cp, hw.dtype_bytes
    # a rank's share of the context; a window may lie on one rank whole
    reads = weight_bytes_per_rank(mc, tp, weight_dtype) + f.kv_read_bytes(mc, tp, b, -(-context // cp))
    tp_comm = 2 * all_reduce_s(mc.hidden_size * b, tp, hw.intra_bandwidth, hw.intra_latency)
    bw, lat = _link(hw, layout)
    merge = f.decode_merge_bytes(mc.num_heads // tp, mc.head_dim, cp) / bw + (cp - 1) * lat if cp > 1 else 0.0
    return reads / hw.memory_bandwidth + mc.num_layers * (tp_comm + merge)


def weight_bytes_per_rank(mc: ModelConfig, tp: int, weight_dtype: str = "bf16") -> int:
    if weight_dtype not in WEIGHT_BYTES:
        raise PlanError(f"weight dtype {weight_dtype!r} is not known; choose one of {', '.join(WEIGHT_BYTES)}")
    return f.weight_params(mc) * WEIGHT_BYTES[weight_dtype] // tp


def max_context(mc: ModelConfig, hw: Hardware, layout: Layout, weight_dtype: str = "bf16") -> int:
    """Tokens whose KV fits beside the weights in each rank's usable memory, over the CP ranks (at most
    the model's context when every layer has a sliding window: their KV stops growing)."""
    free = hw.memory_bytes * hw.memory_fraction - weight_bytes_per_rank(mc, layout.tp, weight_dtype)
    whole = max(0, int(free // f.kv_bytes_per_token(mc, layout.tp, hw.dtype_bytes))) * layout.cp
    if not mc.windowed:
        return whole

    def fits(n: int) -> bool:
        return f.kv_bytes_per_rank(mc, layout.tp, hw.dtype_bytes, n, layout.cp) <= free

    lo, hi = whole, mc.max_position_embeddings  # the first fits (every layer counted whole)
    if hi <= lo or fits(hi):
        return max(lo, hi) if fits(max(lo, hi)) else lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def predict(
    mc: ModelConfig, hw: Hardware, layout: Layout, strategy: str, context: int, weight_dtype: str = "bf16"
) -> Prediction:
    parts = prefill(mc, hw, layout, strategy, context)
    longest = max_context(mc, hw, layout, weight_dtype)
    return Prediction(
        layout=layout.name,
        tp=layout.tp,
        cp=layout.cp,
        strategy=strategy,
        ttft_s=sum(parts.values()),
        decode_ms_per_token=1e3 * decode_s(mc, hw, layout, context, weight_dtype),
        kv_bytes_per_rank=f.kv_bytes_per_rank(mc, layout.tp, hw.dtype_bytes, context, layout.cp),
        max_context_tokens=longest,
        fits=context <= longest,
        **parts,
    )


@dataclass(frozen=True)
class LayoutChoice:
    chosen: Prediction
    layouts: list[Prediction]
    note: str  # empty, or why the choice is a compromise


def choose_layout(
    mc: ModelConfig,
    hw: Hardware,
    context: int,
    gpus: int,
    gpus_per_node: int,
    tp: int | None = None,
    weight_dtype: str = "bf16",
) -> LayoutChoice:
    """Every layout x strategy; the chosen one has the lowest TTFT among those whose memory holds
    the context (then the lowest decode time); when none does, the one closest to holding it."""
    if weight_dtype not in WEIGHT_BYTES:
        raise PlanError(f"weight dtype {weight_dtype!r} is not known; choose one of {', '.join(WEIGHT_BYTES)}")
    rows = [
        predict(mc, hw, layout, s, context, weight_dtype)
        for layout in enumerate_layouts(mc, gpus, gpus_per_node, context, tp)
        for s in strategies_for(mc, layout)
    ]
    fitting = [p for p in rows if p.fits]
    if fitting:
        chosen = min(fitting, key=lambda p: (p.ttft_s, p.decode_ms_per_token))
    else:
        chosen = min(rows, key=lambda p: (-p.max_context_tokens, p.ttft_s, p.decode_ms_per_token))
    note = (
        ""
        if fitting
        else (
            f"no layout holds {context} tokens in memory (the most: {max(p.max_context_tokens for p in rows)}); "
            "add GPUs, use --weight-dtype fp8, or larger-memory hardware"
        )
    )
    return LayoutChoice(chosen, rows, note)
