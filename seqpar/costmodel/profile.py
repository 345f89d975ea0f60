"""A machine profile: this machine's measured rates, for the engine's per-step cost model.

What `seqpar tune` measures and the engine's `strategy="auto"` reads:
- compute, per thread count of a rank: GEMM FLOP/s of the model's linear shapes by row count,
  alone and inside the model's layers with attention stubbed out (norms, RoPE, activations:
  what the layers cost besides attention, as FLOP/s of their linear FLOPs);
  the CPU flash-attention kernel's FLOP/s by query-block rows, causal (square, a diagonal
  block) and unmasked (a block of queries over earlier keys, GQA folded into rows as the
  engine calls it); the fixed cost of one kernel call; memory-copy bytes/s (packing K/V,
  cat/stack of partials);
- links, each t(bytes) = latency + bytes / bandwidth, bytes = what one rank sends (as
  `seqpar.comm.collectives.STATS` counts them): gloo point-to-point (the ring's paired
  isend/irecv), all-to-all, all-gather, and the shared-memory exchange (`HostExchange`);
- overlap: how much of a ring transfer hides behind the attention running meanwhile. On a CPU
  whose every core runs a rank, gloo's transfer has no core of its own and hides only partly.

Rates between measured row counts are interpolated log-log; past the ends they stay flat. A
thread count that was not measured scales the nearest measured one below it linearly.

The file is JSON in the cache folder (`SEQPAR_CACHE_DIR`, default ~/.cache/seqpar); without
one the built-in `DEFAULT` (measured on the machine this project is developed on) applies.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
FILE_NAME = "machine_profile.json"
COMPUTE_KEYS = ("gemm", "linear", "attention_causal", "attention_full", "copy")
LINK_KEYS = ("p2p", "all_to_all", "all_gather", "shm")


def profile_path() -> Path:
    """Where `seqpar tune` writes the profile and the engine looks for it."""
    root = Path(os.environ.get("SEQPAR_CACHE_DIR") or Path.home() / ".cache" / "seqpar")
    return root / FILE_NAME


@dataclass(frozen=True)
class Link:
    latency_s: float  # per message
    bandwidth: float  # bytes one rank sends per second

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.latency_s + nbytes / self.bandwidth if messages else 0.0


@dataclass(frozen=True)
class Rates:
    """One thread count's compute rates: (rows, per second) points, rows ascending."""

    gemm: tuple[tuple[float, float], ...]  # FLOP/s by rows of the model's linear shapes (matmuls alone)
    linear: tuple[tuple[float, float], ...]  # the same FLOPs by rows through whole layers, attention stubbed out
    attention_causal: tuple[tuple[float, float], ...]  # FLOP/s (useful pairs) by square block rows
    attention_full: tuple[tuple[float, float], ...]  # FLOP/s by query rows over earlier keys
    copy: tuple[tuple[float, float], ...]  # bytes/s by bytes copied

    def rate(self, kind: str, x: float) -> float:
        return _interpolate(getattr(self, kind), x)


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Log-log linear between measured points, flat past the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            t = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return points[-1][1]


@dataclass(frozen=True)
class MachineProfile:
    source: str  # who measured it, where and when
    compute: dict[int, Rates]  # threads per rank -> rates
    links: dict[str, Link] = field(default_factory=dict)  # LINK_KEYS
    # The share of the shorter of (compute, transfer) that running them at once saves: 1 = the
    # transfer hides fully behind compute; 0 = they take turns (no core free for the transfer);
    # below 0 = together they are slower than one after the other.
    overlap: float = 1.0
    call_s: float = 0.0  # fixed cost of one attention kernel call (dispatch, setup, merging its partial)

    def __post_init__(self) -> None:
        if not self.compute:
            raise ValueError("a machine profile needs the compute rates of at least one thread count")
        for threads, rates in self.compute.items():
            for kind in COMPUTE_KEYS:
                points = getattr(rates, kind)
                if not points or any(x <= 0 or y <= 0 for x, y in points):
                    raise ValueError(f"{kind} at {threads} threads needs positive (size, rate) points, got {points}")
                if [x for x, _ in points] != sorted({x for x, _ in points}):
                    raise ValueError(f"{kind} at {threads} threads: sizes must ascend, got {[x for x, _ in points]}")
        missing = [k for k in LINK_KEYS if k not in self.links]
        if missing:
            raise ValueError(f"a machine profile needs the links {', '.join(LINK_KEYS)}; missing: {missing}")
        if not self.call_s >= 0:
            raise ValueError(f"call_s must be >= 0, got {self.call_s}")
        if not -1.0 <= self.overlap <= 1.0:
            raise ValueError(f"overlap must lie in [-1, 1], got {self.overlap}")
        for name, link in self.links.items():
            if not (link.latency_s >= 0 and link.bandwidth > 0):
                raise ValueError(f"link {name}: latency must be >= 0 and bandwidth > 0, got {link}")

    def rate(self, kind: str, x: float, threads: int) -> float:
        """Per-second rate of `kind` at size `x` for a rank of `threads` threads."""
        if threads in self.compute:
            return self.compute[threads].rate(kind, x)
        below = [t for t in self.compute if t <= threads] or [min(self.compute)]
        t = max(below)
        return self.compute[t].rate(kind, x) * threads / t

    # ---- JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "compute": {
                str(t): {k: [list(p) for p in getattr(r, k)] for k in COMPUTE_KEYS} for t, r in self.compute.items()
            },
            "links": {name: asdict(link) for name, link in self.links.items()},
            "overlap": self.overlap,
            "call_s": self.call_s,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> MachineProfile:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not a format-{FORMAT} machine profile (a JSON object with format, compute, links)")
        try:
            compute = {
                int(t): Rates(**{k: tuple((float(x), float(y)) for x, y in r[k]) for k in COMPUTE_KEYS})
                for t, r in raw["compute"].items()
            }
            links = {name: Link(float(v["latency_s"]), float(v["bandwidth"])) for name, v in raw["links"].items()}
            return cls(str(raw.get("source", "")), compute, links, float(raw["overlap"]), float(raw["call_s"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"machine profile is incomplete or malformed: {type(e).__name__}: {e}") from e

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else profile_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)  # a reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> MachineProfile:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot use the machine profile {str(path)!r}: {e}; run `seqpar tune` to measure it again, "
                "or delete the file to use the built-in profile"
            ) from e


def load_profile(path: str | Path | None = None) -> MachineProfile:
    """The profile at `path` (default: the cache folder's), or the built-in one when there is none."""
    path = Path(path) if path is not None else profile_path()
    return MachineProfile.load(path) if path.exists() else DEFAULT


# Measured on the machine this project is developed on (2 cores, x86-64, fp32, torch 2.13 CPU,
# SmolLM2-135M's shapes) by `seqpar tune` on 2026-11-30, the profile the validation in
# docs/benchmarks.md ("Choosing the strategy") ran with: the built-in profile when none is saved.
# `linear` was re-measured after the layers' row tiles and faster RoPE (commit bcdd1b3) made them
# cheaper: each point is this profile's GEMM rate times the linear / GEMM ratio of a new tune run
# at that row count (so the machine's drift between the two runs does not enter).
DEFAULT = MachineProfile.from_dict(
    {
        "format": FORMAT,
        "source": "built-in: seqpar tune on the 2-core development machine (2026-11-30)",
        "compute": {
            "1": {
                "gemm": [[1, 8.21e9], [16, 59.4e9], [64, 110e9], [256, 129e9], [1024, 145e9], [4096, 137e9]],
                "linear": [[1, 4.56e9], [16, 39.8e9], [64, 82.8e9], [256, 95.9e9], [1024, 107e9], [4096, 108e9]],
                "attention_causal": [[64, 29.4e9], [256, 48.3e9], [1024, 76.3e9], [2048, 92.2e9]],
                "attention_full": [[1, 18.6e9], [16, 89.0e9], [64, 103e9], [256, 115e9], [1024, 116e9]],
                "copy": [[65536, 33.9e9], [4194304, 13.0e9], [33554432, 6.74e9]],
            },
            "2": {
                "gemm": [[1, 15.0e9], [16, 100e9], [64, 193e9], [256, 261e9], [1024, 295e9], [4096, 265e9]],
                "linear": [[1, 6.68e9], [16, 71.3e9], [64, 126e9], [256, 210e9], [1024, 222e9], [4096, 208e9]],
                "attention_causal": [[64, 41.1e9], [256, 80.8e9], [1024, 131e9], [2048, 156e9]],
                "attention_full": [[1, 19.1e9], [16, 130e9], [64, 151e9], [256, 190e9], [1024, 204e9]],
                "copy": [[65536, 34.8e9], [4194304, 23.3e9], [33554432, 13.8e9]],
            },
        },
        "links": {
            "p2p": {"latency_s": 205e-6, "bandwidth": 1.32e9},
            "all_to_all": {"latency_s": 242e-6, "bandwidth": 1.08e9},
            "all_gather": {"latency_s": 379e-6, "bandwidth": 0.619e9},
            "shm": {"latency_s": 39.2e-6, "bandwidth": 3.37e9},
        },
        "overlap": -0.08,
        "call_s": 110e-6,
    }
)
