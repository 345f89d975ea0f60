"""Incremental detokenization and stop conditions for one completion.

Each step decodes only a short window of ids: the ids since the last committed text
plus the ones before them (vLLM's prefix/read offsets), and keeps the part of the
window's text past the prefix's. Decoding in context handles tokens whose text
depends on neighbours (byte-level BPE pieces of one UTF-8 character, SentencePiece
spaces), and a step costs O(1) instead of re-decoding the whole output.

Two things are held back from the streamed text until the completion ends:
- a trailing U+FFFD, which is an incomplete UTF-8 character that the next
  byte token may complete (its ids stay in the window until it is whole);
- the last len(longest stop string) - 1 characters, which may be the start of
  a stop string that must not reach the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from seqpar.engine.outputs import CompletionOutput, FinishReason, LogprobDict
from seqpar.engine.sampling_params import SamplingParams

_INCOMPLETE_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text, and decides when the completion ends.

    Order of checks for each new token (as in vLLM): EOS (unless ignore_eos) and
    stop_token_ids end with 'stop' and stay out of the text; then max_tokens or the
    context limit end with 'length'; then a stop string found in the text ends with
    'stop', stop_reason = that string, the text truncated just before it.
    Before `min_tokens` tokens none of the stop rules apply (vLLM's order too): an
    early EOS or stop token id is kept as an ordinary token (EOS, a special token,
    stays out of the text), and a stop string there ends nothing.
    Without a tokenizer (a model that has none) the text stays "" and the rules on ids apply.
    """

    def __init__(
        self,
        tokenizer: Any | None,
        params: SamplingParams,
        eos_token_id: int | None = None,
        num_prompt_tokens: int = 0,
        max_model_len: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_token_id = eos_token_id
        self.num_prompt_tokens = num_prompt_tokens
        # Tokens (prompt + output) at which generation must end: the model context
        # or what the KV cache can ever hold, whichever is smaller.
        self.max_model_len = max_model_len
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self._num_seen = 0  # output ids already processed
        self._num_emitted = 0  # characters of self.text already returned as deltas
        self._stop_hold = max((len(s) for s in params.stop), default=1) - 1
        self._committed = ""  # text of ids[:_read], committed
        self._prefix = 0  # the window starts here: context for decoding ids[_read:]
        self._read = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, output_token_ids: Sequence[int]) -> str:
        """Process the ids appended since the last call; returns the new text to stream."""
        if self.finished:
            raise RuntimeError("update() on a finished completion; the engine should have stopped it")
        if len(output_token_ids) < self._num_seen:
            raise ValueError(f"output ids shrank from {self._num_seen} to {len(output_token_ids)}")
        while self._num_seen < len(output_token_ids) and not self.finished:
            self._num_seen += 1
            self._step(output_token_ids[: self._num_seen])
        keep = len(self.text) if self.finished else max(self._num_emitted, len(self.text) - self._stop_hold)
        delta = self.text[self._num_emitted : keep]
        self._num_emitted = max(self._num_emitted, keep)
        return delta

    def _step(self, ids: Sequence[int]) -> None:
        p, tok = self.params, ids[-1]
        text_ids = ids
        early = len(ids) < p.min_tokens
        if not early and not p.ignore_eos and self.eos_token_id is not None and tok == self.eos_token_id:
            self.finish_reason, text_ids = "stop", ids[:-1]
        elif not early and tok in p.stop_token_ids:
            self.finish_reason, self.stop_reason, text_ids = "stop", tok, ids[:-1]
        elif (p.max_tokens is not None and len(ids) >= p.max_tokens) or (
            self.max_model_len is not None and self.num_prompt_tokens + len(ids) >= self.max_model_len
        ):
            self.finish_reason = "length"
        text = self._decode(text_ids)
        # A stop string can only be new if it overlaps text added since the last step.
        search_from = max(0, len(self.text) - self._stop_hold)
        hits = [] if early else [(i, s) for s in p.stop if (i := text.find(s, search_from)) >= 0]
        if hits:
            idx, stop = min(hits)
            text = text[:idx]
            self.finish_reason, self.stop_reason = "stop", stop
        self.text = text

    def _decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (the output so far, minus a stopping token), from a short window."""
        if self.tokenizer is None:
            return ""
        skip = self.params.skip_special_tokens
        window = self.tokenizer.decode(list(ids[self._prefix :]), skip_special_tokens=skip)
        before = self.tokenizer.decode(list(ids[self._prefix : self._read]), skip_special_tokens=skip)
        new = window[len(before) :]
        if self.finished:
            return self._committed + new
        if new and not new.endswith(_INCOMPLETE_CHAR):
            self._committed += new
            self._prefix, self._read = self._read, len(ids)
            return self._committed
        return self._committed + new.rstrip(_INCOMPLETE_CHAR)

    def output(
        self,
        token_ids: list[int],
        cumulative_logprob: float | None = None,
        logprobs: list[LogprobDict] | None = None,
        index: int = 0,
    ) -> CompletionOutput:
        """The completion so far, vLLM-shaped."""
        return CompletionOutput(
            index=index,
            text=self.text,
            token_ids=list(token_ids),
            cumulative_logprob=cumulative_logprob,
            logprobs=logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


def decode_logprobs(tokenizer: Any | None, entries: Sequence[LogprobDict | None]) -> None:
    """Fill `decoded_token` of every Logprob in place, each token decoded on its own (as vLLM does);
    without a tokenizer they stay None."""
    if tokenizer is None:
        return
    cache: dict[int, str] = {}
    for entry in entries:
        for tid, lp in (entry or {}).items():
            if tid not in cache:
                cache[tid] = tokenizer.decode([tid])
            lp.decoded_token = cache[tid]
