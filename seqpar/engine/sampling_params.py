"""What a request asks of sampling, with vLLM's names and defaults: the user's side.

The driver carries these in every step's message; the ranks' `Sampler` (`sampling.py`) applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

_GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, with vLLM's names and defaults."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    seed: int | None = None
    max_tokens: int | None = 16  # None = until the model context (or the cache) is full
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings end nothing before this many tokens
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k alternatives per generated token; 0 = only the chosen one
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn it off")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive int, got {self.top_k!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(
                f"max_tokens must be a positive int or None (until the context is full), got {self.max_tokens!r}"
            )
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or val < 0):
                raise ValueError(f"{name} must be None or an int >= 0 (number of top alternatives), got {val!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        # Normalise to lists so readers need no None / single-string cases.
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        # Like vLLM: below 1e-5 the tempered softmax is argmax up to rounding anyway.
        return self.temperature < _GREEDY_EPS
