"""Attention benchmark: every sequence-parallel strategy against one process, on one causal batch.

    python -m seqpar.bench.attention [--tokens 16384] [--world 2] [--repeats 3] [--json out.json]

Every row does the same work: exact causal attention of one sequence (or a ragged
batch, `--seq-lens`) in fp32, q [T, Hq, D], k/v [T, Hkv, D]. Rows:
- single process: `attention_with_lse` over the whole batch with 1 and with 2 threads;
- every seqpar strategy on `--world` gloo ranks x 1 thread (zigzag shards; also
  contiguous ones for ring, to show the causal imbalance, and for ulysses, to match
  DeepSpeed), each rank timing `sp_attention` on its shard between barriers; a row's
  time is the slowest rank's;
- baselines (`seqpar.bench.baselines`): PyTorch's ring attention and DeepSpeed Ulysses.

Each configuration lives in its own spawned processes (1 process for the single-process
rows, `--world` for the distributed ones; DeepSpeed apart), so thread settings are
clean. The processes stay up and the driver interleaves single forwards: a warm-up
round that also checks every output against the single-process result (max abs
error), then `--repeats` timed rounds, the row order rotating each round, so drift on
a shared machine hits every row alike. Reported: median and best time per forward,
speedups against the 1-thread single process, the same over "quiet" forwards (other
processes used <= `--quiet-load` cores meanwhile, read from /proc/stat) and the
slowest rank's main-thread CPU time (what the forward costs with a core to itself).
`--profile` runs the timed forwards under torch.profiler and splits each row's time per
rank into kernel, LSE merge and communication, from seqpar's named ranges
(`seqpar.profiling`) and the baselines' own ops; nothing is patched.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from dataclasses import asdict

import torch

from seqpar.bench.attention.report import format_profile, format_table, format_targets
from seqpar.bench.attention.rows import BASELINES, ERROR_TOL, build_rows
from seqpar.bench.attention.runner import run_benchmark
from seqpar.bench.report import add_json_arg, run_config, write_json
from seqpar.strategies.api import STRATEGIES

__all__ = ["ERROR_TOL", "main", "parse_args"]

QUICK = dict(tokens=1024, heads=4, kv_heads=2, head_dim=32, repeats=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seqpar bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="length of the one causal sequence (default 16384)")
    p.add_argument(
        "--seq-lens", type=str, default=None, help="comma-separated lengths of a ragged batch (instead of --tokens)"
    )
    p.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    p.add_argument("--world", type=int, default=2, help="ranks of the distributed rows (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; times are medians over them (default 3)")
    p.add_argument(
        "--iters",
        type=int,
        default=1,
        help="timed forwards per row per round (default 1); one warm-up round comes first",
    )
    p.add_argument(
        "--schemes",
        type=str,
        default=None,
        help="comma-separated shard schemes for every strategy (default: zigzag; plus contiguous for ring, "
        "and for ulysses when DeepSpeed runs)",
    )
    p.add_argument(
        "--strategies",
        type=str,
        default=",".join(STRATEGIES),
        help=f"comma-separated seqpar strategies (default {','.join(STRATEGIES)})",
    )
    p.add_argument(
        "--baselines",
        type=str,
        default="all",
        help=f"comma-separated baselines from {','.join(BASELINES)}, or all, or none (default all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small shapes for a smoke test (1024 tokens, 4 heads, 2 kv heads, dim 32, 1 round)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also split each row's time into kernel / merge / communication, per rank",
    )
    p.add_argument(
        "--quiet-load",
        type=float,
        default=0.15,
        metavar="CORES",
        help="a forward counts as quiet when other processes used at most this many cores meanwhile (default 0.15)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random q, k, v (default 0)")
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds one forward may take before its ranks count as hung (default 1800)",
    )
    add_json_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")] if args.seq_lens else [args.tokens]
    if any(n < 1 for n in args.seq_lens):
        p.error(f"sequence lengths must be positive, got {args.seq_lens}")
    for name in ("heads", "kv_heads", "head_dim", "world", "repeats", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, notes = build_rows(args)
    shape = (
        f"{len(args.seq_lens)} sequences {args.seq_lens}"
        if len(args.seq_lens) > 1
        else f"1 sequence of {args.seq_lens[0]} tokens"
    )
    header = (
        f"causal attention, fp32, {shape}, {args.heads} q heads / {args.kv_heads} kv heads, head dim {args.head_dim}; "
        f"{args.repeats} rounds x {args.iters} timed forwards; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    print(header, file=sys.stderr)
    results = run_benchmark(args, rows)
    print(f"\n{header}\n")
    print(format_table(results, args.quiet_load))
    targets = format_targets(results, args.world, args.quiet_load)
    if targets:
        print("\n" + targets)
    for n in notes:
        print(f"- {n}")
    if args.profile:
        print("\nper-rank time split in ms per forward (medians over the timed forwards; torch.profiler):\n")
        print(format_profile(results))
    if args.json:
        base = results[0].median if results and results[0].row.key == "single1" else None
        payload = {
            "config": run_config(args),
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
            "rows": [
                {
                    **asdict(res.row),
                    "samples_s": res.samples,
                    "round_medians_s": res.round_medians,
                    "median_s": res.median,
                    "speedup_vs_single_1_thread": (base / res.median) if base and res.median else None,
                    "busiest_rank_cpu_samples_s": res.cpu_samples,
                    "foreign_load_cores": res.foreign,
                    "quiet_median_s": statistics.median(res.quiet_samples(args.quiet_load))
                    if res.quiet_samples(args.quiet_load)
                    else None,
                    "max_abs_error": res.err,
                    "error": res.error,
                    "profile": res.profile_by_rank(),
                }
                for res in results
            ],
            "notes": notes,
        }
        write_json(args.json, payload)
    bad = [
        res
        for res in results
        if res.row.kind in ("single", "seqpar")
        and (res.error or res.err is None or res.err > ERROR_TOL or res.median is None)
    ]
    for res in bad:
        print(f"FAILED: {res.row.label} [{res.row.scheme}]: {res.error or f'max abs error {res.err}'}", file=sys.stderr)
    return 1 if bad else 0
