"""The parser and the dispatch to one module per command."""

from __future__ import annotations

import argparse
import sys

from seqpar.cli import bench, demo, generate, serve
from seqpar.cli.errors import CLIError, fail
from seqpar.cli.torchrun import under_torchrun
from seqpar.engine.executor import EngineDeadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpar", description="Exact sequence-parallel long-context LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,serve,bench,demo,plan,tune}")
    generate.add_parser(sub)
    bench.add_parser(sub)
    demo.add_parser(sub)
    serve.add_parser(sub)

    from seqpar.costmodel.command import add_plan_args
    from seqpar.costmodel.tune import add_tune_args

    add_plan_args(
        sub.add_parser(
            "plan",
            help="predict prefill, decode and memory of every layout of a cluster",
            description="Predicted TTFT, decode ms/token, KV bytes per rank and longest context "
            "of every layout (TP inside a node x CP across nodes) and strategy; "
            "marks the chosen one.",
        )
    )
    add_tune_args(
        sub.add_parser(
            "tune",
            help="measure this machine's rates for strategy=auto",
            description="Measure GEMM and attention-kernel FLOP/s and the latency and bandwidth of gloo and "
            "shared-memory collectives (under 2 minutes); write the machine profile that strategy=auto "
            "predicts each step's time from.",
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A benchmark parses its own arguments (its --help included): hand them over untouched.
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in bench.BENCHES:
        return bench.run(argv[1], argv[2:])
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench.run(args.name, args.args)
    try:
        if args.command == "demo":
            if under_torchrun():
                raise CLIError("seqpar demo starts its own ranks; run it without torchrun")
            return demo.main(sp_size=args.sp)
        if args.command == "plan":
            from seqpar.costmodel.command import run_plan

            return run_plan(args)
        if args.command == "tune":
            from seqpar.costmodel.tune import run_tune

            return run_tune(args)
        if args.command == "serve":
            return serve.run(args)
        return generate.run(args)
    except (ValueError, EngineDeadError) as e:  # ModelLoadError and ConfigError are ValueErrors
        return fail(e)
    except KeyboardInterrupt:
        print("seqpar: interrupted", file=sys.stderr)
        return 130
