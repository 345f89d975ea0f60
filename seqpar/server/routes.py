"""The routes: the two completion endpoints, and models, health, version, tokenize,
detokenize and metrics."""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from seqpar.server.body import BodyRoute
from seqpar.server.chat import create_chat_completion
from seqpar.server.completions import create_completion
from seqpar.server.metrics import CONTENT_TYPE
from seqpar.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from seqpar.server.serving import ServerState

router = APIRouter(route_class=BodyRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request (OpenAI error shape)"},
    401: {"description": "missing or wrong API key"},
    404: {"description": "unknown model"},
    503: {"description": "the engine is down or restarting"},
}
_STARTED = int(time.time())


def _state(request: Request) -> ServerState:
    return request.app.state.seqpar


def version() -> str:
    try:
        return metadata.version("seqpar")
    except metadata.PackageNotFoundError:
        return "unknown"


@router.post("/v1/chat/completions", responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    return await create_chat_completion(_state(request), body, request)


@router.post("/v1/completions", responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await create_completion(_state(request), body, request)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    s = _state(request)
    return {
        "object": "list",
        "data": [
            {
                "id": s.model_name,
                "object": "model",
                "created": _STARTED,
                "owned_by": "seqpar",
                "root": s.model_name,
                "max_model_len": s.max_model_len,
            }
        ],
    }


@router.get("/health", responses={503: _ERRORS[503]})
async def health(request: Request) -> Response:
    engine = _state(request).engine
    if not engine.healthy:
        detail = f"; last error: {engine.last_error}" if engine.last_error else ""
        raise APIError(503, f"the engine is {engine.status}{detail}")
    return Response(status_code=200)


@router.get("/version")
async def get_version() -> dict:
    return {"version": version()}


@router.post("/tokenize", responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    s = _state(request)
    s.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt (text) or messages (a conversation)", "prompt")
    if body.messages is not None:
        ids = await s.off_loop(s.chat_ids, body.messages, body.add_generation_prompt)
    else:
        s.check_text(body.prompt or "", "prompt")
        ids = await s.off_loop(s.encode, body.prompt or "", body.add_special_tokens)
    return {"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids}


@router.post("/detokenize", responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    s = _state(request)
    s.check_model(body.model)

    def detokenize() -> str:
        if any(t >= s.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must lie in [0, {s.vocab_size}) for this model", "tokens")
        return s.decode(body.tokens, "/detokenize", "tokens")

    return {"prompt": await s.off_loop(detokenize)}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)
