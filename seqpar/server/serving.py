"""What both completion endpoints share: the server's state, prompt checks, sampling
params, usage, server-sent events and the client-disconnect watch."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from seqpar.engine.async_llm import AsyncLLM, EngineDownError, RequestStream, RequestUpdate
from seqpar.engine.outputs import RequestOutput
from seqpar.engine.sampling import SamplingParams
from seqpar.engine.tokenizer import LazyTokenizer, TokenizerUnavailableError
from seqpar.server.metrics import ServerMetrics
from seqpar.server.protocol import APIError, ChatMessage, SamplingFields


@dataclass
class ServerState:
    engine: AsyncLLM
    tokenizer: LazyTokenizer  # the server's own copy: the engine's belongs to the engine thread
    model_name: str
    metrics: ServerMetrics
    api_key: str | None = None

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

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """The conversation through the model's chat template, as `LLM.chat_prompt` renders it."""
        tokenizer = self.need_tokenizer("a chat conversation", "messages")
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt", "messages")
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            ids = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=True
            )
        except Exception as e:  # the template itself may refuse a conversation (jinja raise_exception)
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from e
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        """What the engine would refuse, said before anything is queued (a batch is all or nothing)."""
        limit, vocab = self.max_model_len, self.vocab_size
        if not ids:
            raise APIError(400, "the prompt is empty; send at least one token", param)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab}) for this model", param)
        if len(ids) >= limit:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens, and the prompt has "
                f"{len(ids)} tokens, which leaves no room to generate; shorten the prompt",
                param,
            )
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the "
                "completion); reduce the prompt or max_tokens",
                "max_tokens",
            )


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
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
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
