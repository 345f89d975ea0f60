"""What a request must be for the engine to take it: the one place the prompt is checked.

`LLMEngine.add_request` calls it before queueing; the server calls it before queueing any prompt
of a batch (a batch is all or nothing), and turns the refusal into a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence


class PromptRefused(ValueError):
    """A request the engine could never run, however long it waited; `param`: the field at fault."""

    def __init__(self, message: str, param: str = "prompt") -> None:
        super().__init__(message)
        self.param = param


def check_prompt(
    ids: Sequence[int], vocab_size: int, max_model_len: int, max_tokens: int | None = None, why: str = ""
) -> None:
    """Refuse an empty prompt, one that leaves no room to generate (`why`: what sets the limit, for
    the message), token ids outside the vocabulary, and, when `max_tokens` is given, a prompt plus
    completion longer than the limit (the engine itself stops a sequence at the limit instead)."""
    limit = max_model_len
    if not ids:
        raise PromptRefused("empty prompt: send at least one token (a non-empty string or token-id list)")
    if len(ids) >= limit:  # before the vocabulary: a prompt far too long is not scanned
        raise PromptRefused(
            f"this model's maximum context length is {limit} tokens{why}, and the prompt has {len(ids)} tokens, "
            "which leaves no room to generate; shorten the prompt"
        )
    if any(not 0 <= t < vocab_size for t in ids):
        raise PromptRefused(f"prompt token ids must lie in [0, {vocab_size}) for this model")
    if max_tokens is not None and len(ids) + max_tokens > limit:
        raise PromptRefused(
            f"this model's maximum context length is {limit} tokens; you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the "
            "completion); reduce the prompt or max_tokens",
            "max_tokens",
        )
