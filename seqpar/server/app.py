"""The FastAPI application: routes, the API key, and every error in OpenAI's shape.

Validation errors are 400 (not FastAPI's 422) and name the field; unknown routes and
methods keep their status; anything unexpected is a 500 in the same shape and is
logged, and the server carries on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from seqpar.server.body import error_response, validation_error
from seqpar.server.protocol import APIError
from seqpar.server.routes import router, version
from seqpar.server.serving import ServerState

log = logging.getLogger("seqpar.server")
# With a key set, these need it; /health, /metrics, /version and the docs stay open.
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")


class APIKeyMiddleware:
    """Bearer-key check before anything else runs (the body is not even read), compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(_PROTECTED):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.key):
                e = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="seqpar", version=version(), description="OpenAI-compatible API of a seqpar engine.")
    app.state.seqpar = state
    app.include_router(router)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(
            APIError(e.status_code, str(e.detail)).body(),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    if state.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)
    return app


class Server(uvicorn.Server):
    """uvicorn's server, plus one 'ready' line once listening, and the engine stopped first at shutdown."""

    def __init__(self, config: uvicorn.Config, engine: Any, name: str):
        super().__init__(config)
        self.engine, self.name = engine, name

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            print(f"seqpar: serving {self.name!r} at http://{host}:{self.config.port}/v1", flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        # Ending the engine first ends every open stream (with an error event), so connections
        # close now rather than after the graceful-shutdown timeout.
        await asyncio.to_thread(self.engine.shutdown, 15.0)  # within torchrun's 30 s grace before SIGKILL
        await super().shutdown(sockets)
