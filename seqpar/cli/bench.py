"""`seqpar bench NAME [...]`: hand the arguments to the benchmark `seqpar.bench.NAME`."""

from __future__ import annotations

import argparse
import importlib

from seqpar.cli.errors import fail

BENCHES = ("attention", "engine", "core", "decode", "serve", "auto")


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks",
        description=(
            "seqpar bench attention [...]: every SP strategy against one process. "
            "seqpar bench engine [...]: the engine end to end. Arguments after the name go to the benchmark; "
            "see seqpar bench NAME --help."
        ),
    )
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")


def run(name: str, argv: list[str]) -> int:
    module_name = f"seqpar.bench.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return fail(f"benchmark {name!r} is not available in this version of seqpar")
    return module.main(argv) or 0
