"""Request results, shaped like vLLM's so code written against vLLM reads ours unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Logprob:
    """One token's log-probability under the raw model distribution.

    `rank` is 1 for the most likely token (ties share the better rank). Mutable
    because `decoded_token` is filled in after sampling, by the detokenizer.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One generated (or prompt) position: token id -> its Logprob. Holds the chosen
# token plus the top-k, so it has k or k + 1 entries.
LogprobDict = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One completion of a request (seqpar generates exactly one, index 0)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[LogprobDict] | None
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended generation; None for EOS or length.
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything known about a request so far; `finished` once its completion ended."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[LogprobDict | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    # Timings and counters (arrival_time, first_token_time, finished_time, ...), seconds.
    metrics: dict[str, Any] = field(default_factory=dict)
    # Prompt tokens whose KV came from the prefix cache instead of being computed (vLLM's field).
    num_cached_tokens: int = 0
    num_stored_tokens: int = 0  # of those, loaded from the KV store (host memory or kv_store_dir)
    num_host_tokens: int = 0  # of those, from host memory (kv_store_host_gb); the rest from disk


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine for metrics (the server's /metrics reads it after every step)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: list[float]  # per SP rank, fraction 0-1 of its KV blocks in use
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # cumulative prompt tokens found there
    kv_store_hits: int = 0  # cumulative prompt tokens loaded from the KV store (host memory or kv_store_dir)
    kv_store_misses: int = 0  # cumulative stored blocks that could not be loaded (damaged or gone): recomputed
    kv_store_bytes_read: int = 0  # cumulative bytes of block files loaded
    kv_store_bytes_written: int = 0  # cumulative bytes of block files sent to be written (in the background)
    kv_store_load_seconds: float = 0.0  # cumulative seconds the driver waited for the ranks' loads
    kv_store_host_hits: int = 0  # cumulative blocks loaded from host memory (kv_store_host_gb)
    kv_store_host_bytes: int = 0  # bytes of K/V the ranks hold in host memory now
    kv_store_host_bytes_written: int = 0  # cumulative bytes of K/V copied to host memory
    sp_bytes_sent: list[int] = field(default_factory=list)  # cumulative bytes each SP rank sent


@dataclass(frozen=True)
class StepRecord:
    """One engine step, as the engine's `observers` see it (benchmarks, metrics), like vLLM's
    per-iteration stats: what ran, how long the ranks took, what each rank sent."""

    strategy: str  # the prefill attention strategy the step ran (auto's choice under strategy="auto")
    seconds: float  # the ranks' time: the step message out to its result back (no scheduling, no sampling)
    prefill_spans: list[tuple[int, int]]  # positions [start, end) each prefilling sequence computed
    num_decode: int  # sequences that decoded one token
    produced: list[int]  # the request ids that got a token
    comm_bytes: list[int]  # bytes each SP rank sent in this step
    # strategy="auto" on a step with prefill: the cost model's predicted seconds per strategy; else None
    predicted_s: dict[str, float] | None = None

    @property
    def decode_only(self) -> bool:
        return not self.prefill_spans

    @property
    def num_prefill_tokens(self) -> int:
        return sum(end - start for start, end in self.prefill_spans)
