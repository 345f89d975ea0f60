"""One request inside the engine: its tokens, progress and KV blocks (the scheduler and the block
manager both work on it)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from seqpar.engine.outputs import LogprobDict
from seqpar.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens, progress and KV blocks; `seq_id` is the request's one id everywhere."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    cumulative_logprob: float = 0.0
    output_logprobs: list[LogprobDict] = field(default_factory=list)
    # per layer group (KVGroups), the block of each logical block on its owner rank; -1: freed (out of
    # a window group's reach) or not held
    blocks: list[list[int]] = field(default_factory=list)
    released: dict[int, int] = field(default_factory=dict)  # per window group, blocks below this are freed
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int | None = None  # prompt tokens reused from the prefix cache at first admission
    num_stored_tokens: int = 0  # of those, loaded from the KV store (host memory or kv_store_dir)
    num_host_tokens: int = 0  # of those, from host memory (kv_store_host_gb)
    loads: list[tuple[int, int]] = field(default_factory=list)  # (logical block, group) to load before the next step

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.seq_id}: the prompt has no tokens; send at least one")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
