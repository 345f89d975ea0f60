"""What both completion endpoints share: the server's state, prompt checks, sampling
params, usage, server-sent events and the client-disconnect watch.

Text is bounded before it is tokenized: a text longer than `max_text_chars` has more tokens
than the context holds (seqpar/engine/token_bounds.py), so it is refused by its length. The
tokenizer's work (encoding, chat templates, decoding whole lists) runs in one worker thread,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from seqpar.engine.admission import PromptRefused, check_prompt
from seqpar.engine.async_llm import AsyncLLM, EngineDownError, RequestStream, RequestUpdate
from seqpar.engine.outputs import RequestOutput
from seqpar.engine.sampling_params import SamplingParams
from seqpar.engine.token_bounds import TokenBound, token_bound
from seqpar.engine.tokenizer import LazyTokenizer, TokenizerUnavailableError
from seqpar.server.body import default_max_body_bytes
from seqpar.server.metrics import ServerMetrics
from seqpar.server.protocol import APIError, ChatMessage, SamplingFields

T = TypeVar("T")
# OpenAI takes up to 4 stop strings, vLLM any number; every one is searched for at every step.
MAX_STOP_STRINGS = 64


@dataclass
class ServerState:
    engine: AsyncLLM
    tokenizer: LazyTokenizer  # the server's own copy: the engine's belongs to the engine thread
    model_name: str
    metrics: ServerMetrics
    api_key: str | None = None
    max_body_bytes: int | None = None  # None: default_max_body_bytes(max_model_len)
    token_bound: TokenBound | None = field(init=False, default=None)  # None: the tokenizer has none

    def __post_init__(self) -> None:
        if self.max_body_bytes is None:
            self.max_body_bytes = default_max_body_bytes(self.max_model_len)
        tokenizer = self.tokenizer.get_or_none()
        self.token_bound = token_bound(tokenizer) if tokenizer is not None else None
        # One thread, as vLLM has: a fast tokenizer is not safe to use from several at once.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="seqpar-tokenizer")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the tokenizer's thread, so the event loop keeps answering meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(fn, *args))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}", "model")

    def need_tokenizer(self, need: str, param: str | None) -> Any:
        """The tokenizer, or a 400 saying that `need` needs one (the model has no tokenizer files)."""
        try:
            return self.tokenizer.get(need)
        except TokenizerUnavailableError as e:
            raise APIError(400, str(e), param) from e

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.need_tokenizer("a text prompt", "prompt").encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], need: str = "decoding tokens", param: str | None = None) -> str:
        return self.need_tokenizer(need, param).decode(ids)

    @property
    def max_text_chars(self) -> int | None:
        """No text of more (counted) characters fits the context; None: no such bound."""
        return None if self.token_bound is None else self.max_model_len * self.token_bound.chars

    def check_text(self, text: str, param: str, counted: bool = True) -> None:
        """Refuse a text with more characters than any text that fits the context (`counted`:
        not counting those the tokenizer turns into no token)."""
        bound, limit = self.token_bound, self.max_text_chars
        if bound is None or limit is None or len(text) <= limit:
            return
        if (bound.counted(text, limit) if counted else len(text)) > limit:
            raise APIError(
                400,
                f"{param} has {len(text)} characters, more than the {limit} that can fit this model's maximum "
                f"context length of {self.max_model_len} tokens (no token of its tokenizer stands for more than "
                f"{bound.chars} characters); shorten it",
                param,
            )

    def check_stops(self, req: SamplingFields) -> None:
        """Bounds on what the engine checks at every step of the request."""
        stop = req.stop
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"{len(stops)} stop strings; send at most {MAX_STOP_STRINGS}", "stop")
        for i, s in enumerate(stops):  # longer than any text the model can generate: it could never match
            self.check_text(s, "stop" if isinstance(stop, str) else f"stop[{i}]", counted=False)
        if req.stop_token_ids and len(req.stop_token_ids) > self.vocab_size:
            raise APIError(
                400,
                f"{len(req.stop_token_ids)} stop_token_ids, more than the vocabulary's {self.vocab_size} ids",
                "stop_token_ids",
            )

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """The conversation through the model's chat template, as `LLM.chat_prompt` renders it
        (render, then encode without special tokens), bounded after rendering: the messages' own
        lengths bound nothing, as a template may trim or leave out what they say."""
        tokenizer = self.need_tokenizer("a chat conversation", "messages")
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt", "messages")
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            text = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as e:  # the template itself may refuse a conversation (jinja raise_exception)
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from e
        self.check_text(text, "messages")
        return list(tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, prompt: str | list[int], max_tokens: int | None, param: str = "prompt") -> list[int]:
        """A prompt's token ids, checked; for the worker thread (linear in the prompt)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids, max_tokens, param)
        return ids

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        """What the engine would refuse, said before anything is queued (a batch is all or nothing);
        `param`: the body's field that holds the prompt."""
        try:
            check_prompt(ids, self.vocab_size, self.max_model_len, max_tokens)
        except PromptRefused as e:
            raise APIError(400, str(e), param if e.param == "prompt" else e.param) from e


def sampling_params(
    req: SamplingFields, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens={req.min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from e


def usage(out: RequestOutput) -> dict:
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # cached_tokens counts every tier, as vLLM's clients expect; stored_tokens: those loaded from
        # the KV store rather than found in the running engine's cache; host_tokens: of those, the ones
        # from host memory (--kv-store-host-gb), the rest from disk (--kv-store-dir)
        "prompt_tokens_details": {
            "cached_tokens": out.num_cached_tokens,
            "stored_tokens": out.num_stored_tokens,
            "host_tokens": out.num_host_tokens,
        },
    }


def request_id(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_event(e: APIError | EngineDownError) -> str:
    err = e if isinstance(e, APIError) else APIError(503, str(e))
    return sse(err.body())


async def submit(state: ServerState, prompt: list[int], params: SamplingParams) -> RequestStream:
    """Queue one prompt; engine-side refusals become 400, a dead engine 503."""
    try:
        return await state.engine.add_request(prompt, params)
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from e
    except EngineDownError as e:
        raise APIError(503, str(e)) from e


async def tracked(state: ServerState, stream: RequestStream) -> AsyncIterator[RequestUpdate]:
    """The stream's updates, observed by the metrics; leaving early aborts the request."""
    tracker = state.metrics.tracker()
    async with stream:
        try:
            async for update in stream:
                tracker.observe(update)
                yield update
        finally:
            tracker.close()


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so aborting its requests) if the client hangs up first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise APIError(499, "the client disconnected")
    return task.result()


async def merged(streams: list[AsyncIterator[RequestUpdate]]) -> AsyncIterator[tuple[int, RequestUpdate]]:
    """(index, update) from several streams as they come (a batch of completion prompts)."""
    if len(streams) == 1:
        async for u in streams[0]:
            yield 0, u
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestUpdate]) -> None:
        try:
            async for u in s:
                await queue.put((i, u))
            await queue.put((i, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
