"""The engine benchmark's configurations (rows) and its targets."""

from __future__ import annotations

from dataclasses import dataclass

# Targets from the issue.
TARGET_TTFT_VS_SP1 = 0.55
TARGET_TTFT_VS_HF = 0.90
TARGET_KV_RATIO = 0.52


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    sp: int
    threads: int
    decode_merge: str = "allgather"
    ttft: bool = True  # timed for time to first token
    decode: bool = True  # timed for decode

    @property
    def shape(self) -> str:
        return f"{self.sp} x {self.threads}"


def build_configs(merges: list[str]) -> list[Config]:
    configs = [
        Config("sp1-1t", "seqpar SP 1, 1 thread", 1, 1, decode=False),
        Config(
            "sp2",
            "seqpar SP 2 (ring, snake), 1 thread/rank",
            2,
            1,
            merges[0] if merges else "allgather",
            decode=bool(merges),
        ),
        Config("sp1-2t", "seqpar SP 1, 2 threads", 1, 2),
    ]
    for m in merges[1:]:
        configs.append(Config(f"sp2-{m}", f"seqpar SP 2, decode merge {m}", 2, 1, m, ttft=False))
    return configs


def decode_label(c: Config) -> str:
    return f"seqpar SP 2, decode merge {c.decode_merge}" if c.sp == 2 else c.label
