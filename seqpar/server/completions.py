"""POST /v1/completions: one prompt or a batch, text or token ids, `echo`, legacy logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from seqpar.engine.async_llm import EngineDownError, RequestStream, RequestUpdate
from seqpar.engine.outputs import LogprobDict
from seqpar.server.protocol import APIError, CompletionRequest
from seqpar.server.serving import (
    SSE_DONE,
    ServerState,
    error_event,
    merged,
    request_id,
    sampling_params,
    sse,
    submit,
    tracked,
    unless_disconnected,
    usage,
)


class LegacyLogprobs:
    """OpenAI's legacy `logprobs` object for one choice, built token by token:
    tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def add(self, token_ids: list[int], entries: list[LogprobDict | None], decode: Any) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(token_ids, entries):
            token = entry[tid].decoded_token if entry else decode([tid])
            token = token or ""
            out["tokens"].append(token)
            out["token_logprobs"].append(max(entry[tid].logprob, -9999.0) if entry else None)
            out["top_logprobs"].append(
                {(lp.decoded_token or ""): max(lp.logprob, -9999.0) for lp in entry.values()} if entry else None
            )
            out["text_offset"].append(self.offset)
            self.offset += len(token)
        return out


def _extend(acc: dict, more: dict) -> None:
    for key, values in more.items():
        acc.setdefault(key, []).extend(values)


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Any:
    state.check_model(body.model)
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt is an empty list; send a string, a list of strings or token ids", "prompt")
    for p in prompts:
        if isinstance(p, str):
            state.check_text(p, "prompt")
    state.check_stops(body)
    ids = await state.off_loop(lambda: [state.prompt_ids(p, body.max_tokens) for p in prompts])
    want = body.logprobs
    # Said before anything is queued: these need the tokenizer, which a model may lack.
    texts = [""] * len(prompts)
    if body.echo:
        texts = await state.off_loop(
            lambda: [p if isinstance(p, str) else state.decode(p, "echo of a token-id prompt", "echo") for p in prompts]
        )
    if want is not None:
        state.need_tokenizer("logprobs (their tokens are text)", "logprobs")
    if body.stop:
        state.need_tokenizer("stop strings", "stop")
    params = sampling_params(body, body.max_tokens, want, want if body.echo and want is not None else None)
    streams: list[RequestStream] = []
    try:
        for one in ids:
            streams.append(await submit(state, one, params))
    except BaseException:
        for s in streams:
            s.abort()
        raise
    rid, created = request_id("cmpl")

    def abort_all() -> None:
        for s in streams:
            s.abort()

    job = _Job(state, streams, ids, texts, body.echo, want, rid, created)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            job.stream(include_usage), media_type="text/event-stream", background=BackgroundTask(abort_all)
        )
    try:
        return await unless_disconnected(request, job.complete())
    finally:
        abort_all()


class _Job:
    def __init__(
        self,
        state: ServerState,
        streams: list[RequestStream],
        ids: list[list[int]],
        texts: list[str],
        echo: bool,
        logprobs: int | None,
        rid: str,
        created: int,
    ):
        self.state, self.streams, self.ids, self.texts = state, streams, ids, texts
        self.echo, self.logprobs, self.rid, self.created = echo, logprobs, rid, created
        self.lps = [LegacyLogprobs() for _ in streams]

    def _echo(self, i: int, u: RequestUpdate) -> tuple[str, dict | None]:
        """The prompt's text (and its tokens' logprobs) as the start of choice i."""
        if self.logprobs is None:
            return self.texts[i], None
        plp = u.output.prompt_logprobs or [None] * len(self.ids[i])
        return self.texts[i], self.lps[i].add(self.ids[i], plp, self.state.decode)

    def _new_logprobs(self, i: int, u: RequestUpdate) -> dict | None:
        if self.logprobs is None:
            return None
        return self.lps[i].add(u.token_ids, list(u.logprobs or []), self.state.decode)

    def _body(self, choices: list[dict], obj_usage: dict | None = None, chunk: bool = False) -> dict:
        body = {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }
        if obj_usage is not None or not chunk:
            body["usage"] = obj_usage
        return body

    def _usage(self, finals: list[RequestUpdate]) -> dict:
        us = [usage(u.output) for u in finals]
        total = {k: sum(u[k] for u in us) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        total["prompt_tokens_details"] = {
            k: sum(u["prompt_tokens_details"][k] for u in us) for k in ("cached_tokens", "stored_tokens", "host_tokens")
        }
        return total

    async def complete(self) -> JSONResponse:
        finals: list[RequestUpdate | None] = [None] * len(self.streams)
        started = [False] * len(self.streams)
        texts = [""] * len(self.streams)
        lps: list[dict] = [{} for _ in self.streams]
        try:
            async for i, u in merged([tracked(self.state, s) for s in self.streams]):
                if not started[i] and self.echo:
                    text, lp = self._echo(i, u)
                    texts[i] += text
                    _extend(lps[i], lp or {})
                started[i] = True
                texts[i] += u.text
                _extend(lps[i], self._new_logprobs(i, u) or {})
                if u.finished:
                    finals[i] = u
        except EngineDownError as e:
            raise APIError(503, str(e)) from e
        done = [f for f in finals if f is not None]
        choices = [
            {
                "index": i,
                "text": texts[i],
                "logprobs": lps[i] if self.logprobs is not None else None,
                "finish_reason": f.output.outputs[0].finish_reason,
                "stop_reason": f.output.outputs[0].stop_reason,
            }
            for i, f in enumerate(done)
        ]
        return JSONResponse(self._body(choices, self._usage(done)))

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        started = [False] * len(self.streams)
        finals: list[RequestUpdate] = []
        try:
            async for i, u in merged([tracked(self.state, s) for s in self.streams]):
                text, lp = "", None
                if not started[i] and self.echo:
                    text, lp = self._echo(i, u)
                started[i] = True
                text += u.text
                new = self._new_logprobs(i, u)
                if lp is not None and new is not None:
                    _extend(lp, new)
                lp = lp or new
                if not (text or u.finished or lp):
                    continue
                comp = u.output.outputs[0]
                yield sse(
                    self._body(
                        [
                            {
                                "index": i,
                                "text": text,
                                "logprobs": lp,
                                "finish_reason": comp.finish_reason if u.finished else None,
                                **({"stop_reason": comp.stop_reason} if u.finished else {}),
                            }
                        ],
                        chunk=True,
                    )
                )
                if u.finished:
                    finals.append(u)
            if include_usage:
                yield sse(self._body([], self._usage(finals), chunk=True))
        except (EngineDownError, APIError) as e:
            yield error_event(e)
        finally:
            for s in self.streams:
                s.abort()
        yield SSE_DONE
