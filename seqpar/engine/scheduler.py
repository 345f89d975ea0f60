"""Continuous batching with a token budget: what each step computes, for which sequences.

Every step has `max_num_batched_tokens` tokens to spend across the SP group
(vLLM V1's model: no separate prefill and decode phases). Running sequences go
first, in admission order: one token each when decoding, the next chunk of their
prompt while still prefilling. Then waiting requests are admitted in arrival
order, each reusing its longest cached prefix and prefilling (a chunk of) the rest,
while budget, `max_num_seqs` and KV blocks last. So one step can carry decode
tokens and a prefill chunk, a long prompt never stalls running decodes for its
whole prefill, and while others wait a long prompt's chunk is capped at
`long_prefill_token_threshold` so short prompts get through beside it.

Blocks are allocated as tokens are written. When a running sequence cannot get
the blocks its tokens need, the most recently admitted running sequence is
preempted: its blocks are freed (full ones stay cached by hash, so recomputing
them is often a prefix hit) and it goes back to the front of the queue, to be
recomputed exactly from its prompt and the tokens it had generated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from seqpar.engine.block_manager import BlockManager
from seqpar.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """Compute tokens [start, start + num_new) of `seq` in this step."""

    seq: Sequence
    start: int
    num_new: int
    decode: bool  # the one new token is the last sampled one: every SP rank runs it, partials merge by LSE

    @property
    def wants_logits(self) -> bool:
        """The chunk reaches the last known token, so the step samples the next one."""
        return self.start + self.num_new == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per step, across the SP group
    long_prefill_token_threshold: int = 1024  # a prefill chunk's cap while other requests wait

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a request (checked already: `admission.check_prompt`)."""
        if seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"request {seq.seq_id} is {seq.status.value}; only new sequences can be added")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if n > 1 and self.waiting:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        out: dict[int, ScheduledSeq] = {}
        preempted = False
        # Decodes first (one token each, so a long prefill never stalls them), then chunks of
        # prompts still prefilling; both in admission order.
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in order:
            if budget <= 0 or seq.status is not SequenceStatus.RUNNING:
                continue
            n = self._chunk(seq, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the most recently admitted
                if victim.seq_id in out:
                    budget += out.pop(victim.seq_id).num_new
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                out[seq.seq_id] = self._scheduled(seq, n)
                budget -= n
        scheduled = list(out.values())
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq)
            seq.num_computed_tokens = cached
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(cached, seq.num_prompt_tokens)
            self.waiting.popleft()  # so _chunk sees only the others
            n = self._chunk(seq, budget)
            if not self.blocks.allocate(seq, cached + n):
                self.blocks.free(seq)
                self.waiting.appendleft(seq)
                break
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._scheduled(seq, n))
            budget -= n
        return scheduled

    @staticmethod
    def _scheduled(seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, n, decode=n == 1 and start == seq.num_tokens - 1 and seq.num_output_tokens > 0)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, scheduled: list[ScheduledSeq]) -> None:
        """After a step: its tokens are cached; filled blocks become reusable by hash."""
        for s in scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new
            self.blocks.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
