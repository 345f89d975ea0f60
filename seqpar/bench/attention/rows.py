"""The attention benchmark's rows (what runs, on how many ranks and threads) and their results."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field

from seqpar.strategies.api import STRATEGIES

ERROR_TOL = 1e-4  # fp32: seqpar rows must match the single process to this (max abs)
BASELINES = ("torch_ring", "deepspeed")


@dataclass(frozen=True)
class Row:
    """One line of the table: what runs, on how many ranks and threads."""

    key: str
    label: str
    kind: str  # single | seqpar | torch_ring | deepspeed
    world: int
    threads: int
    scheme: str = ""
    strategy: str = ""
    ulysses_degree: int | None = None
    rotate: str = ""
    layout: str = ""


@dataclass
class Result:
    row: Row
    samples: list[float] = field(default_factory=list)  # seconds per forward (max over ranks)
    round_medians: list[float] = field(default_factory=list)
    cpu_samples: list[float] = field(default_factory=list)  # main-thread CPU seconds of the busiest rank
    foreign: list[float] = field(default_factory=list)  # per sample: cores other processes used meanwhile
    round_foreign: list[float] = field(default_factory=list)  # per round: the most of its samples
    err: float | None = None
    error: str | None = None
    profile: list[list[dict[str, float]]] = field(default_factory=list)  # per timed forward, per rank: seconds

    def profile_by_rank(self) -> list[dict[str, float]]:
        """Per rank, the median over timed forwards of each profiled quantity."""
        if not self.profile:
            return []
        out = []
        for rank in range(len(self.profile[0])):
            keys = set().union(*(fwd[rank].keys() for fwd in self.profile))
            out.append({k: statistics.median(fwd[rank].get(k, 0.0) for fwd in self.profile) for k in keys})
        return out

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def quiet_samples(self, threshold: float) -> list[float]:
        return [t for t, f in zip(self.samples, self.foreign) if f <= threshold]

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_samples) if self.cpu_samples else None


def build_rows(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    w = args.world
    rows = [
        Row("single1", "single process, attention_with_lse", "single", 1, 1),
        Row("single2", "single process, attention_with_lse", "single", 1, 2),
    ]
    notes: list[str] = []
    baselines = (
        BASELINES if args.baselines == "all" else tuple(b for b in args.baselines.split(",") if b and b != "none")
    )
    for b in baselines:
        if b not in BASELINES:
            raise SystemExit(f"unknown baseline {b!r}; choose from {', '.join(BASELINES)}, all or none")
    explicit_schemes = args.schemes is not None
    schemes = args.schemes.split(",") if explicit_schemes else ["zigzag"]
    for strategy in args.strategies.split(","):
        if strategy not in STRATEGIES:
            raise SystemExit(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        strat_schemes = list(schemes)
        if strategy == "ring" and not explicit_schemes:
            strat_schemes.append("contiguous")  # to show the causal imbalance zigzag removes
        if strategy == "ulysses" and not explicit_schemes and "deepspeed" in baselines:
            strat_schemes.append("contiguous")  # like for like with DeepSpeed Ulysses, which takes contiguous shards
        degrees: list[int | None] = [None]
        if strategy == "usp":
            degrees = []
            for u in dict.fromkeys((1, w)):
                if w % u == 0 and args.heads % u == 0:
                    degrees.append(u)
                else:
                    notes.append(
                        f"usp with ulysses_degree={u} skipped: needs {u} to divide world {w} and heads {args.heads}"
                    )
        for scheme in strat_schemes:
            for u in degrees:
                name = strategy if u is None else f"{strategy} (ulysses_degree={u})"
                key = f"{strategy}-{scheme}" + ("" if u is None else f"-u{u}")
                rows.append(Row(key, f"seqpar {name}", "seqpar", w, 1, scheme, strategy, u))
    if "torch_ring" in baselines:
        rows.append(
            Row(
                "torch_ring-allgather",
                "PyTorch ring (_templated_ring_attention, rotate=allgather)",
                "torch_ring",
                w,
                1,
                "zigzag",
                rotate="allgather",
            )
        )
        rows.append(
            Row(
                "torch_ring-alltoall",
                "PyTorch ring (_templated_ring_attention, rotate=alltoall)",
                "torch_ring",
                w,
                1,
                "zigzag",
                rotate="alltoall",
            )
        )
        # The same, fed views of token-major memory (what seqpar's strategies get): isolates the layout effect.
        rows.append(
            Row(
                "torch_ring-allgather-token-major",
                "PyTorch ring (rotate=allgather), q/k/v as views of token-major [T, H, D] memory",
                "torch_ring",
                w,
                1,
                "zigzag",
                rotate="allgather",
                layout="token-major",
            )
        )
    if "deepspeed" in baselines:
        rows.append(Row("deepspeed", "DeepSpeed Ulysses (DistributedAttention)", "deepspeed", w, 1, "contiguous"))
    return rows, notes


def launch_groups(rows: list[Row]) -> list[tuple[str, int, int, list[Row]]]:
    """Rows that can share spawned processes: same world and threads (DeepSpeed alone: its import patches state)."""
    groups: dict[tuple[str, int, int], list[Row]] = {}
    for r in rows:
        tag = r.kind if r.kind in ("single", "deepspeed") else "sp"
        groups.setdefault((f"{tag}{r.threads}", r.world, r.threads), []).append(r)
    return [(name, world, threads, rs) for (name, world, threads), rs in groups.items()]
