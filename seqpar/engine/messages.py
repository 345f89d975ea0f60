"""What the driver sends the ranks each step, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from seqpar.engine.outputs import LogprobDict
from seqpar.engine.sampling_params import SamplingParams


@dataclass
class SeqStep:
    """Tokens [start, start + len(token_ids)) of one sequence, to compute in this step."""

    seq_id: int
    token_ids: list[int]
    start: int
    blocks: list[int]  # physical block of each logical block covering [0, start + len(token_ids)), on its owner
    decode: bool  # one new token run on every SP rank, partial attention merged by LSE
    logits: bool  # next-token logits of the last new token are wanted
    num_prompt_tokens: int
    prompt_logprobs: int | None = None  # top-k for prompt positions in this chunk; None = not wanted
    next_token: int | None = None  # the token after the chunk (prompt logprobs of its last position)
    sampling: SamplingParams | None = None  # set when `logits`: rank 0 samples the next token
    banned: list[int] = field(default_factory=list)  # token ids it may not draw now (min_tokens)


@dataclass
class Step:
    seqs: list[SeqStep]
    strategy: str  # prefill attention over the caches: ring (pass-KV), pass_q or allgather
    finished: list[int] = field(default_factory=list)  # sequences gone since the last step: drop their state
    # (SP rank, physical block, chained hash) of blocks this step fills: their owner copies them to the
    # KV store after the step (host memory, kv_store_dir); then host memory drops the (SP rank, hash) blocks
    # of kv_drop
    kv_save: list[tuple[int, int, bytes]] = field(default_factory=list)
    kv_drop: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class KVLoad:
    """Before a step: fill these blocks (SP rank, physical block, chained hash) from the KV store (host
    memory first, else disk)."""

    blocks: list[tuple[int, int, bytes]]


@dataclass
class KVLoadResult:
    failed: list[int]  # indices into KVLoad.blocks that some rank could not load (missing or bad file)


@dataclass
class Sampled:
    token_id: int
    logprob: float  # raw log-prob of the chosen token
    top_logprobs: LogprobDict | None  # the chosen token plus the top-k, when logprobs were asked


@dataclass
class StepResult:
    logits: dict[int, Tensor] = field(default_factory=dict)  # seq_id -> next-token logits [V] fp32 (between ranks)
    sampled: dict[int, Sampled] = field(default_factory=dict)  # seq_id -> the token rank 0 drew (to the driver)
    prompt_logprobs: dict[int, dict[int, dict]] = field(default_factory=dict)  # seq_id -> position -> LogprobDict
    # seq_id -> each SP rank's (top logit, its token id, logsumexp) over its vocabulary slice, in rank
    # order: a greedy row of a static step at SP > 1 (between ranks; rank 0 picks the token)
    tops: dict[int, list[tuple[float, int, float]]] = field(default_factory=dict)
    comm_bytes: list[int] = field(default_factory=list)  # bytes each rank sent in this step
