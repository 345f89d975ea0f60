"""Request bodies of the OpenAI-compatible API (pydantic), and the API's error.

Unknown fields are ignored, as vLLM does. Bounds live on the fields, so a bad value
is a 400 that names its field; checks that need the model (prompt length, vocabulary)
happen in the routes. Sampling values keep to the OpenAI API's ranges, as vLLM checks them.

Every list stops at its first bad item (FailFast): pydantic otherwise collects one error per
item, which made a few MiB of wrong-typed items cost seconds on the event loop. A list inside a
union is a named alias, as FailFast cannot be hashed into a typing.Union before Python 3.12.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, FailFast, Field, StrictInt, StrictStr, field_validator
from typing_extensions import TypeAliasType

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_TOP_LOGPROBS = 20

MAX_TEMPERATURE = 2.0
OPENAI_MAX_TOKENS_DEFAULT = 16  # /v1/completions, max_tokens absent or null

TokenId = Annotated[StrictInt, Field(ge=0, le=I64_MAX)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Strings = TypeAliasType("Strings", Annotated[list[StrictStr], FailFast()])
TokenIds = TypeAliasType("TokenIds", Annotated[list[TokenId], FailFast()])
# Prompt ids are any ints here: the route checks them against the vocabulary, which also
# refuses negative ones, and a plain int list validates ~3x faster.
PromptIds = TypeAliasType("PromptIds", Annotated[list[StrictInt], FailFast()])
PromptIdLists = TypeAliasType("PromptIdLists", Annotated[list[PromptIds], FailFast()])


class APIError(Exception):
    """An error for the client, sent as {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        503: "service_unavailable_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.status,
            }
        }


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields both completion endpoints share, vLLM's extras included."""

    model: str | None = None  # None: the served model
    temperature: Finite | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    seed: int | None = Field(None, ge=I64_MIN, le=I64_MAX)
    stop: StrictStr | Strings | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=I64_MAX)
    n: int = Field(1, json_schema_extra={"const": 1})  # the validator explains other values
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Finite | None = Field(None, ge=-2.0, le=2.0, json_schema_extra={"enum": [0, None]})
    frequency_penalty: Finite | None = Field(None, ge=-2.0, le=2.0, json_schema_extra={"enum": [0, None]})
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(
                f"n={n} is not supported: seqpar returns one choice per prompt; use n=1 "
                "(or send the request several times with different seeds)"
            )
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and any(not s for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must be non-empty")
        return stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported by seqpar; leave them unset or 0")
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


TextParts = TypeAliasType("TextParts", Annotated[list[TextPart], FailFast()])


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | TextParts | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = Field(None, ge=1, le=I64_MAX)  # None: until the context is full
    max_completion_tokens: int | None = Field(None, ge=1, le=I64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    # One prompt or a batch; token ids or text. Strict types: "12" is text, 12 a token id.
    prompt: StrictStr | Strings | PromptIds | PromptIdLists
    max_tokens: int | None = Field(OPENAI_MAX_TOKENS_DEFAULT, ge=1, le=I64_MAX)  # null: the default too
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("max_tokens")
    @classmethod
    def _default_max_tokens(cls, max_tokens: int | None) -> int:
        return OPENAI_MAX_TOKENS_DEFAULT if max_tokens is None else max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, fail_fast=True)
    add_special_tokens: bool = False  # what the completion routes do
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId] = Field(fail_fast=True)
