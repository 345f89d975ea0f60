"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from seqpar.engine.async_llm import EngineDownError, RequestStream
from seqpar.engine.outputs import LogprobDict
from seqpar.server.protocol import APIError, ChatCompletionRequest
from seqpar.server.serving import (
    SSE_DONE,
    ServerState,
    error_event,
    request_id,
    sampling_params,
    sse,
    submit,
    tracked,
    unless_disconnected,
    usage,
)


def _lp(x: float) -> float:
    return max(x, -9999.0)  # -inf is not JSON; OpenAI reports -9999


def chat_logprobs(entries: list[LogprobDict], token_ids: list[int], k: int) -> list[dict]:
    """OpenAI's `logprobs.content`: each chosen token, with its top-k alternatives."""
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        top = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:k]
        content.append(
            {
                "token": chosen.decoded_token or "",
                "logprob": _lp(chosen.logprob),
                "bytes": list((chosen.decoded_token or "").encode()),
                "top_logprobs": [
                    {
                        "token": lp.decoded_token or "",
                        "logprob": _lp(lp.logprob),
                        "bytes": list((lp.decoded_token or "").encode()),
                    }
                    for _, lp in top
                ],
            }
        )
    return content


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Any:
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")  # as vLLM says
    state.check_stops(body)
    max_tokens = body.max_completion_tokens or body.max_tokens  # None: until the context is full, as vLLM

    def prompt_ids() -> list[int]:
        ids = state.chat_ids(body.messages)
        state.check_prompt(ids, max_tokens, "messages")
        return ids

    ids = await state.off_loop(prompt_ids)
    k = body.top_logprobs or 0
    params = sampling_params(body, max_tokens, k if body.logprobs else None)
    stream = await submit(state, ids, params)
    rid, created = request_id("chatcmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(state, stream, rid, created, include_usage, body.logprobs, k),
            media_type="text/event-stream",
            background=BackgroundTask(stream.abort),
        )
    return await unless_disconnected(request, _complete(state, stream, rid, created, body.logprobs, k))


async def _complete(state: ServerState, stream: RequestStream, rid: str, created: int, logprobs: bool, k: int) -> Any:
    try:
        async for update in tracked(state, stream):
            last = update
    except EngineDownError as e:
        raise APIError(503, str(e)) from e
    out = last.output
    comp = out.outputs[0]
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": comp.text},
        "logprobs": {"content": chat_logprobs(comp.logprobs or [], comp.token_ids, k)} if logprobs else None,
        "finish_reason": comp.finish_reason,
        "stop_reason": comp.stop_reason,
    }
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "choices": [choice],
            "usage": usage(out),
        }
    )


async def _stream(
    state: ServerState, stream: RequestStream, rid: str, created: int, include_usage: bool, logprobs: bool, k: int
) -> AsyncIterator[str]:
    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.model_name,
            "choices": choices,
            **extra,
        }
        if include_usage:
            body.setdefault("usage", None)
        return sse(body)

    try:
        yield chunk(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )
        async for u in tracked(state, stream):
            comp = u.output.outputs[0]
            if not (u.text or u.finished or (logprobs and u.token_ids)):
                continue
            yield chunk(
                [
                    {
                        "index": 0,
                        "delta": {"content": u.text} if u.text else {},
                        "logprobs": {"content": chat_logprobs(u.logprobs or [], u.token_ids, k)} if logprobs else None,
                        "finish_reason": comp.finish_reason if u.finished else None,
                        **({"stop_reason": comp.stop_reason} if u.finished else {}),
                    }
                ]
            )
            if u.finished and include_usage:
                yield chunk([], usage=usage(u.output))
    except (EngineDownError, APIError) as e:
        yield error_event(e)
    yield SSE_DONE
