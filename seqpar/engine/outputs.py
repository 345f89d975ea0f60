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
