"""Layouts of N devices: tensor parallelism (TP) inside a node, context parallelism (CP, = SP)
over the rest, and the strategies each layout admits. Impossible ones are refused with the fix."""

from __future__ import annotations

from dataclasses import dataclass

from seqpar.model.config import ModelConfig
from seqpar.strategies.registry import costs, strategies


class PlanError(ValueError):
    """A layout or request that cannot work, saying what would."""


@dataclass(frozen=True)
class Layout:
    tp: int  # ranks splitting heads and MLP, all inside one node (NVLink)
    cp: int  # ranks splitting the sequence; each holds the whole model (over its TP group)
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.tp * self.cp

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    @property
    def cp_crosses_nodes(self) -> bool:
        """A CP ring over several nodes moves at the network's speed: its slowest hop bounds every step."""
        return self.nodes > 1

    @property
    def name(self) -> str:
        return f"TP{self.tp} x CP{self.cp}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(mc: ModelConfig, layout: Layout, context: int) -> None:
    """Raise PlanError naming the problem and the fix when `layout` cannot serve `context` tokens."""
    if layout.tp > layout.gpus_per_node:
        raise PlanError(
            f"TP {layout.tp} spans more than one node of {layout.gpus_per_node} GPUs: TP all-reduces "
            f"twice per layer and needs NVLink; use TP <= {layout.gpus_per_node} and CP across nodes"
        )
    if mc.num_heads % layout.tp != 0:
        ok = [d for d in _divisors(mc.num_heads) if d <= layout.gpus_per_node]
        raise PlanError(
            f"{mc.num_heads} attention heads cannot split over TP {layout.tp}: use a TP degree "
            f"dividing {mc.num_heads} ({', '.join(map(str, ok))})"
        )
    if mc.num_kv_heads % layout.tp != 0 and layout.tp % mc.num_kv_heads != 0:
        raise PlanError(
            f"{mc.num_kv_heads} KV heads neither split over nor replicate evenly across TP {layout.tp}: "
            f"use a TP degree that divides or is a multiple of {mc.num_kv_heads}"
        )
    if layout.cp > context:
        raise PlanError(
            f"CP {layout.cp} ranks but only {context} tokens: some rank would hold none; "
            f"use at most {context} CP ranks (fewer GPUs, or more TP)"
        )


def enumerate_layouts(
    mc: ModelConfig, gpus: int, gpus_per_node: int, context: int, tp: int | None = None
) -> list[Layout]:
    """Every valid (TP, CP) with TP inside a node and TP x CP = gpus; with `tp` given, that one alone."""
    if gpus < 1 or gpus_per_node < 1:
        raise PlanError(f"--gpus and --gpus-per-node must be >= 1, got {gpus} and {gpus_per_node}")
    if context < 1:
        raise PlanError(f"--context must be >= 1 token, got {context}")
    if gpus > gpus_per_node and gpus % gpus_per_node != 0:
        lower, upper = gpus // gpus_per_node * gpus_per_node, -(-gpus // gpus_per_node) * gpus_per_node
        raise PlanError(
            f"--gpus {gpus} is not a multiple of --gpus-per-node {gpus_per_node}: nodes must be whole; "
            f"use --gpus {lower} or {upper}, or a --gpus-per-node that divides {gpus}"
        )
    per_node = min(gpus, gpus_per_node)
    if tp is not None:
        if gpus % tp != 0:
            raise PlanError(
                f"--tp {tp} does not divide --gpus {gpus}; use one of {', '.join(map(str, _divisors(gpus)))}"
            )
        layout = Layout(tp, gpus // tp, per_node)
        check_layout(mc, layout, context)
        return [layout]
    found, reasons = [], []
    for t in _divisors(per_node):
        if gpus % t:
            continue
        layout = Layout(t, gpus // t, per_node)
        try:
            check_layout(mc, layout, context)
            found.append(layout)
        except PlanError as e:
            reasons.append(f"{layout.name}: {e}")
    if not found:
        raise PlanError(f"no layout of {gpus} GPUs can serve {context} tokens of this model: " + "; ".join(reasons))
    return found


def strategies_for(mc: ModelConfig, layout: Layout) -> tuple[str, ...]:
    """Every strategy that declares a layout cost; one sequence rank: no CP strategy ("local").
    A strategy that swaps heads for sequence (Ulysses) needs the rank's heads to split over CP."""
    if layout.cp == 1:
        return ("local",)
    heads_split = (mc.num_heads // layout.tp) % layout.cp == 0
    table = strategies()
    return tuple(
        name
        for name, cost in costs().items()
        if cost.layout_s is not None and (heads_split or not table[name].heads_divide_degree)
    )
