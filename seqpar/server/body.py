"""Request bodies as the server takes them: JSON only (415), no larger than the server's limit
(413: by Content-Length before anything is read, or counted while a chunked body arrives), parsed
and validated in a worker thread rather than by FastAPI on the event loop, and the memory of a
large refused body handed back to the system.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from seqpar.server.protocol import APIError

MIB = 1 << 20
# The default body limit: 16 bytes per token of the context, enough for a full-context prompt as
# token ids ("151642, " is 8 bytes) or as typical text, and at least 16 MiB. Parsing is linear in
# the body (up to ~50 ms per MiB of dense JSON numbers), so the limit also bounds that.
DEFAULT_BODY_BYTES_PER_TOKEN, MIN_DEFAULT_BODY_BYTES = 16, 16 * MIB
# A refused body at least this large is followed by malloc_trim: glibc keeps freed heap pages
# (and raises its mmap threshold after large frees), so without it the process stays as large
# as its largest refused request.
TRIM_AFTER_BYTES = MIB


def default_max_body_bytes(max_model_len: int) -> int:
    return max(MIN_DEFAULT_BODY_BYTES, DEFAULT_BODY_BYTES_PER_TOKEN * max_model_len)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; pydantic's union tags dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in ("str", "int", "list", "dict"):
            out += f".{part}" if out else part
    return out or None


def validation_error(errors: list[Any]) -> APIError:
    """pydantic's errors as one 400 naming the first field at fault."""
    if not errors:
        return APIError(400, "invalid request body")
    if errors[0].get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({errors[0].get('ctx', {}).get('error', 'decode error')})")
    parts = []
    for err in errors[:3]:
        param = _param(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{param}: {msg}" if param else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return APIError(400, "; ".join(parts) + more, _param(tuple(errors[0].get("loc", ()))))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's, among the process's own symbols
    except (OSError, AttributeError):
        return None


def trim_memory() -> None:
    """Give freed heap memory back to the system (glibc only; elsewhere there is nothing to call)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


async def read_body(request: Request, limit: int) -> bytes:
    content_type = request.headers.get("content-type", "")
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        given = f", not {content_type!r}" if content_type else ""
        raise APIError(415, f"the body must be JSON: send 'Content-Type: application/json'{given}")
    too_large = f"bytes; this server takes at most {limit} ({limit / MIB:g} MiB, --max-request-body-mb)"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the body has {int(length)} {too_large}")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no Content-Length: count as it comes
        size += len(chunk)
        request.state.body_bytes = size
        if size > limit:
            raise APIError(413, f"the body has more than {limit} {too_large}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """The body as `model`; an empty body is an empty object, so the error names what is missing."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None


class _Parsed(Request):
    """The request with its body already parsed: FastAPI takes the model from json() (an instance
    of the route's model passes its validation as it is) and, seeing a non-empty body(), calls it."""

    def __init__(self, request: Request, value: BaseModel):
        super().__init__(request.scope, request.receive)
        self._value = value

    async def body(self) -> bytes:
        return b"{}"

    async def json(self) -> Any:
        return self._value


def _body_model(endpoint: Callable[..., Any]) -> type[BaseModel] | None:
    hints = typing.get_type_hints(endpoint)
    models = [t for k, t in hints.items() if k != "return" and isinstance(t, type) and issubclass(t, BaseModel)]
    return models[0] if models else None


class BodyRoute(APIRoute):
    """A route whose body model is read and validated here (see the module's docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = _body_model(self.endpoint)
        if model is None:
            return handler

        async def handle(request: Request) -> Response:
            body = await read_body(request, request.app.state.seqpar.max_body_bytes)
            value = await asyncio.to_thread(parse, model, body)
            del body
            return await handler(_Parsed(request, value))

        async def route(request: Request) -> Response:
            try:
                response = await handle(request)
            except APIError as e:
                # Answered here rather than by the app's handler, so that by the time the response
                # is sent, the traceback (and with it the body and the parsed request) is gone.
                response = error_response(e)
            large = getattr(request.state, "body_bytes", 0) >= TRIM_AFTER_BYTES
            if large and response.status_code >= 400 and response.background is None:
                response.background = BackgroundTask(trim_memory)
            return response

        return route
