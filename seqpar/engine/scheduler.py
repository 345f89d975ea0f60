"""Continuous batching: which sequences run next, and whether as prefill or decode.

The scheduler knows nothing about ranks or blocks. The engine answers one
question through `fits`: could the cache side reserve room for this batch of
new prompts, on top of everything running? The scheduler never preempts, so
`fits` must account for decode growth, for instance by reserving each
sequence's `max_total_tokens` on admission.

Policy (vLLM's default without chunked prefill): admit waiting requests in
arrival order while they fit, and run them as one prefill; when none can be
admitted, decode every running sequence. New requests therefore join between
decode steps. Admission is strictly FCFS: a request that does not fit blocks
the ones behind it, so a long prompt is never starved by short ones.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import torch

from seqpar.engine.outputs import LogprobDict
from seqpar.engine.sampling import SamplingParams, make_generator


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class RequestTooLongError(ValueError):
    """The request could never be scheduled, however long it waited."""

    def __init__(self, message: str, seq: "Sequence | None" = None) -> None:
        super().__init__(message)
        self.seq = seq


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress. `seq_id` keys it in every rank's KV cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    # Tokens (prompt + output) this sequence may ever reach; set by Scheduler.add.
    max_total_tokens: int = 0
    cumulative_logprob: float = 0.0
    output_logprobs: list[LogprobDict] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt has no tokens; send at least one")
        if self.generator is None:
            self.generator = make_generator(self.params.seed)

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

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


class ScheduledBatch(NamedTuple):
    kind: Literal["prefill", "decode", "idle"]
    seqs: list[Sequence]


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # Prompt tokens per prefill batch. A single prompt larger than this still runs, alone:
    # without chunked prefill there is no other way to serve it.
    max_num_batched_tokens: int = 8192
    # Longest sequence (prompt + output) the engine can ever hold: min(model context, cache size).
    max_tokens_ever: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_tokens_ever"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {val!r}")


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        fits: Callable[[list[Sequence]], bool],
        max_tokens_ever: int,
    ) -> None:
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_tokens_ever)
        self.fits = fits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a request; reject it now if it could never run."""
        limit = self.config.max_tokens_ever
        if seq.num_prompt_tokens > limit:
            raise RequestTooLongError(
                f"request {seq.request_id!r}: prompt has {seq.num_prompt_tokens} tokens but this engine holds at "
                f"most {limit} tokens per sequence (min of model context and KV cache); shorten the prompt "
                f"or give the cache more memory / more ranks"
            )
        if seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"request {seq.request_id!r} is {seq.status.value}; only new sequences can be added")
        max_new = seq.params.max_tokens if seq.params.max_tokens is not None else limit
        seq.max_total_tokens = min(seq.num_prompt_tokens + max_new, limit)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Next batch: a prefill of newly admitted requests if any fit, else a decode of all running."""
        batch: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if batch and num_tokens + seq.num_prompt_tokens > self.config.max_num_batched_tokens:
                break
            if not self.fits(batch + [seq]):
                break
            batch.append(self.waiting.popleft())
            num_tokens += seq.num_prompt_tokens
        if batch:
            for seq in batch:
                seq.status = SequenceStatus.RUNNING
            self.running.extend(batch)
            return ScheduledBatch("prefill", batch)
        if self.running:
            return ScheduledBatch("decode", list(self.running))
        if self.waiting:
            # Nothing runs, so the cache is empty: if the head does not fit now it never will.
            # Retire it so the queue behind it moves; the error carries it for the engine to report.
            head = self.waiting.popleft()
            head.status = SequenceStatus.FINISHED
            raise RequestTooLongError(
                f"request {head.request_id!r} ({head.num_prompt_tokens} prompt tokens, up to "
                f"{head.max_total_tokens} in all) does not fit in an empty KV cache; lower max_tokens_ever "
                f"to what the cache holds so add() rejects such requests, or give the cache more memory",
                head,
            )
        return ScheduledBatch("idle", [])

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted); the engine frees its cache blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> list[Sequence]:
        """Retire every sequence of a request; returns them so the engine can free their blocks."""
        found = [s for s in [*self.waiting, *self.running] if s.request_id == request_id]
        for seq in found:
            self.finish(seq)
        return found
