"""`seqpar serve`: build the engine, then serve it over HTTP with uvicorn.

Locally the engine starts its own ranks and rebuilds them after a failure. Under
torchrun, rank 0 serves HTTP and drives the engine while the other ranks serve its
steps; a failed engine cannot be rebuilt from rank 0 alone, so the server then exits
non-zero (torchrun's --max-restarts brings the job back).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from seqpar.cli.errors import CLIError
from seqpar.cli.torchrun import run_under_torchrun, under_torchrun
from seqpar.engine.args import add_engine_args, engine_config
from seqpar.engine.config import EngineConfig

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server",
        description=(
            "Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, ...). "
            "Under torchrun, rank 0 serves HTTP: torchrun --nproc-per-node N -m seqpar serve --sp N ..."
        ),
    )
    add_engine_args(serve.add_argument_group("engine"), torchrun=True)
    group = serve.add_argument_group("server")
    group.add_argument(
        "--served-model-name", default=None, metavar="NAME", help="the model's name in the API (default: --model)"
    )
    group.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    group.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)")
    group.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* and tokenize routes (default: $SEQPAR_API_KEY; none = open)",
    )
    group.add_argument(
        "--max-request-body-mb",
        type=float,
        default=None,
        metavar="MIB",
        help="refuse request bodies larger than this many MiB with 413 (default: 16 bytes per token of the "
        "context, at least 16 MiB)",
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port {args.port} is not a TCP port (0-65535)")
    if args.max_request_body_mb is not None and not args.max_request_body_mb > 0:
        raise CLIError(f"--max-request-body-mb {args.max_request_body_mb} must be a positive number of MiB")
    if under_torchrun():
        # the tokenizer is optional: a model without one serves token ids
        return run_under_torchrun(args, lambda config, _: _serve(args, config, torchrun=True))
    return _serve(args, engine_config(args), torchrun=False)


def _serve(args: argparse.Namespace, config: EngineConfig, torchrun: bool) -> int:
    def factory() -> Any:
        from seqpar.engine.llm_engine import LLMEngine

        return LLMEngine(config, torchrun=torchrun)

    # Locally a failed engine is rebuilt; under torchrun it cannot be from rank 0 alone.
    return run_server(args, config, factory, restart=not torchrun)


def run_server(args: argparse.Namespace, config: EngineConfig, factory: Callable[[], Any], restart: bool) -> int:
    import uvicorn

    from seqpar.engine.async_llm import AsyncLLM
    from seqpar.engine.tokenizer import LazyTokenizer
    from seqpar.server.app import Server, build_app
    from seqpar.server.metrics import ServerMetrics
    from seqpar.server.serving import ServerState

    holder: dict[str, Any] = {}

    def on_dead() -> None:  # only without restart: stop serving a dead engine
        server = holder.get("server")
        if server is not None:
            server.should_exit = True
            holder["dead"] = True

    engine = AsyncLLM(factory, restart=restart, on_dead=on_dead).start()  # raises ValueError on a bad model
    name = args.served_model_name or config.model
    tokenizer = LazyTokenizer(config.model)
    tokenizer.get_or_none()  # now, not in the first request; a model without one serves token ids
    body_mb = args.max_request_body_mb
    state = ServerState(
        engine,
        tokenizer,
        name,
        ServerMetrics(engine, name),
        args.api_key or os.environ.get("SEQPAR_API_KEY") or None,
        max_body_bytes=None if body_mb is None else int(body_mb * 2**20),
    )
    uv_config = uvicorn.Config(
        build_app(state), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = holder["server"] = Server(uv_config, engine, name)
    try:
        server.run()
    finally:
        engine.shutdown(15.0)
    if holder.get("dead"):
        print(f"seqpar: error: the engine failed and cannot restart here: {engine.last_error}", file=sys.stderr)
        return 1
    return 0 if server.started else 1
