"""Serving benchmark: `seqpar serve` at SP 1 and SP 2 and llama.cpp's OpenAI server under load.

    flock /tmp/seqpar-cpu.lock seqpar bench serve [--servers sp1,sp2,llamacpp] [--concurrency 1,4,8]
        [--requests 4,4,8] [--prompt-tokens 4000] [--output-tokens 64] [--bench-venv .venv-bench]
        [--json docs/serve-bench.json] [--plot docs/serve-bench.png]
    python -m seqpar.bench.serve --quick --model TINY_DIR   # a smoke test: no bench venv, no plot

Each server is started here on a free port, warmed with one short request, driven at each
concurrency with its own long-document questions (serve_load.py: every request a different
document), and stopped. seqpar runs with prefix caching off (`--no-enable-prefix-caching`),
so every request prefills its whole prompt, and with the same total KV cache at every SP
degree (`--kv-cache-gb` split over the ranks). llama.cpp (llama-cpp-python's server, the same
GGUF file, 2 threads, n_ctx 8192) runs from the bench-only virtualenv, which also holds
guidellm; it has no `ignore_eos`, so its requests carry a logit bias that forbids the EOS
tokens instead (every request must still produce `--output-tokens` tokens: checked).
With `--vllm-python PYTHON --vllm-model DIR`, server `vllm` is added: `vllm serve DIR` from that
Python's environment (seqpar.bench.vllm_baseline.serve_command: every core, prefix caching off).

Then two paired checks (serve_pairs.py): the server's overhead against `LLM.generate`, and SP 2's
time to first token against SP 1's. The results file, table, targets and plot: serve_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from seqpar.bench import vllm_baseline
from seqpar.bench.report import add_json_arg, summary_line
from seqpar.bench.serve_load import run_guidellm, run_openai, workload
from seqpar.bench.serve_pairs import one_token, ttft_pairs
from seqpar.bench.serve_report import plot, save, table, targets
from seqpar.bench.serve_servers import (
    LLAMA_CPP,
    VLLM,
    RunningServer,
    ServerSpec,
    bench_versions,
    code_version,
    eos_token_ids,
    server_specs,
)
from seqpar.model.loader import DEFAULT_MODEL


def drive(
    args: argparse.Namespace,
    spec: ServerSpec,
    url: str,
    rows: list[dict[str, Any]],
    conc: int,
    workdir: Path,
    tokenizer_dir: str,
) -> dict[str, Any]:
    if args.driver == "guidellm":
        return run_guidellm(
            str(Path(args.bench_venv) / "bin" / "guidellm"),
            url,
            "bench",
            rows,
            tokenizer_dir,
            conc,
            workdir,
            f"{spec.name}-c{conc}",
            spec.extras,
            health_route=None if spec.health == "/health" else spec.health.lstrip("/"),
        )
    return run_openai(url + "/v1", "bench", rows, conc, spec.extras)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seqpar bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="seqpar's model (llama.cpp gets --gguf)")
    p.add_argument("--gguf", default=None, help="llama.cpp's model file (default: --model's GGUF)")
    p.add_argument("--servers", default=f"sp1,sp2,{LLAMA_CPP}", help="comma-separated: spN and/or llamacpp")
    p.add_argument("--concurrency", default="1,4,8", help="concurrent streams, comma-separated")
    p.add_argument(
        "--requests",
        default="4,4,8",
        help="requests per concurrency level: one number, or one per level (default: 4,4,8: four one "
        "after another at 1 stream, one burst of every stream at 4 and at 8)",
    )
    p.add_argument("--prompt-tokens", type=int, default=4000)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="seqpar's KV cache, GiB over all SP ranks")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads per server, split over ranks")
    p.add_argument("--driver", choices=("guidellm", "openai"), default="guidellm")
    p.add_argument("--bench-venv", default=".venv-bench", help="the virtualenv holding guidellm and llama-cpp-python")
    p.add_argument("--one-token-pairs", type=int, default=5, help="paired 1-token HTTP / LLM.generate runs (0: none)")
    p.add_argument("--one-token-server", default="sp2", help="which seqpar server the 1-token check uses")
    p.add_argument(
        "--ttft-pairs",
        type=int,
        default=4,
        help="paired 1-token requests to SP 1 and SP 2 up side by side (0: none; needs sp1 and sp2)",
    )
    p.add_argument("--workdir", default=None, help="keep logs, data and guidellm reports here (default: a temp dir)")
    add_json_arg(p, help="results file (default: docs/serve-bench.json; '' for none)")
    p.add_argument("--plot", default=None, help="plot file (default: docs/serve-bench.png; '' for none)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: sp1 only, 2 requests at concurrency 1 and 2, 48-token prompts, 4 output "
        "tokens, the openai driver, one pair, no files unless asked",
    )
    vllm_baseline.add_arguments(p)
    args = p.parse_args(argv)
    vllm_baseline.check_arguments(p, args)
    if args.vllm_python and VLLM not in args.servers.split(","):
        args.servers += f",{VLLM}"
    elif VLLM in args.servers.split(",") and not args.vllm_python:
        p.error(f"--servers {VLLM} needs --vllm-python and --vllm-model")
    if args.quick:
        args.servers, args.concurrency, args.requests, args.driver = "sp1", "1,2", "2", "openai"
        args.prompt_tokens, args.output_tokens, args.one_token_pairs, args.one_token_server = 48, 4, 1, "sp1"
        args.ttft_pairs = 0
        args.kv_cache_gb = 0.01
    if args.json is None:
        args.json = "" if args.quick else "docs/serve-bench.json"
    if args.plot is None:
        args.plot = "" if args.quick else "docs/serve-bench.png"
    return args


def levels(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """The concurrency levels and the requests sent at each."""
    concs = [int(c) for c in args.concurrency.split(",") if c]
    counts = [int(n) for n in args.requests.split(",") if n]
    counts = counts * len(concs) if len(counts) == 1 else counts
    if len(counts) != len(concs) and concs:
        raise SystemExit(f"seqpar bench serve: --requests gives {len(counts)} counts for {len(concs)} levels")
    return concs, counts


LEVEL_KEYS = ("requests", "errors", "ttft_s", "itl_ms", "e2e_s", "output_tokens_per_s", "output_tokens_min")


def load_levels(
    args: argparse.Namespace,
    server: RunningServer,
    concs: list[int],
    rows: dict[int, list[dict[str, Any]]],
    results: dict[str, Any],
    workdir: Path,
    tokenizer_dir: str,
) -> None:
    """Drive one running server at every concurrency level, saving the results after each."""
    spec = server.spec
    per = results["load"][spec.name] = {}
    for c in concs:
        try:
            r = per[str(c)] = drive(args, spec, server.url, rows[c], c, workdir, tokenizer_dir)
        except (subprocess.CalledProcessError, OSError, RuntimeError) as e:
            per[str(c)] = {"failed": f"{type(e).__name__}: {e}"[:300], "server_exit": server.proc.poll()}
            print(f"  {spec.name} concurrency {c}: FAILED {per[str(c)]}", flush=True)
            if server.proc.poll() is not None:
                break  # the server is gone (its exit code says how): on to the next server
            continue
        r["loadavg_after"] = os.getloadavg()
        r["server_exit"] = server.proc.poll()  # None: still up (an external kill shows here)
        print("  " + summary_line(f"{spec.name} concurrency {c}", {k: r.get(k) for k in LEVEL_KEYS}), flush=True)
        save(results, args.json)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from seqpar.comm.launch import free_port
    from seqpar.model import load_tokenizer
    from seqpar.model.loader import resolve_model

    concs, counts = levels(args)
    if LLAMA_CPP in args.servers.split(",") and args.gguf is None:
        args.gguf = str(resolve_model(args.model))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="seqpar-bench-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model)
    tokenizer_dir = str(workdir / "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)  # guidellm counts tokens with the same tokenizer
    eos_ids = eos_token_ids(tokenizer)
    port = free_port()
    results: dict[str, Any] = {
        "args": vars(args),
        "workdir": str(workdir),
        "load": {},
        "one_token": None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg(),
        "seqpar": code_version(),
        "bench_venv": bench_versions(args.bench_venv),
    }
    # Request rows: each level its own documents (no row is sent twice to a server).
    rows, first = {}, 1
    for c, n in zip(concs, counts):
        rows[c] = workload(tokenizer, n, args.prompt_tokens, args.output_tokens, first=first)
        first += n
    warm = workload(tokenizer, 1, min(256, args.prompt_tokens), 4, first=0)[0]
    for spec in server_specs(args, port, eos_ids):
        one = spec.name == args.one_token_server and args.one_token_pairs > 0
        if not concs and not one:
            continue
        print(f"seqpar bench serve: starting {spec.name}: {' '.join(spec.cmd)}", flush=True)
        server = RunningServer(spec, port, workdir / f"{spec.name}.server.log")
        try:
            run_openai(server.url + "/v1", "bench", [warm], 1, spec.extras)  # first-request costs, untimed
            load_levels(args, server, concs, rows, results, workdir, tokenizer_dir)
            if one and server.proc.poll() is None:
                prompt = workload(tokenizer, 1, args.prompt_tokens, 1, first=first + args.ttft_pairs)[0]["prompt"]
                results["one_token"] = one_token(args, server, prompt)
                print("  " + summary_line("one token", results["one_token"]), flush=True)
        finally:
            server.stop()
        save(results, args.json)
    if args.ttft_pairs > 0 and {"sp1", "sp2"} <= set(args.servers.split(",")):
        pairs = workload(tokenizer, args.ttft_pairs, args.prompt_tokens, 1, first=first)
        results["ttft_pairs"] = ttft_pairs(args, eos_ids, workdir, pairs, warm)
        print("  " + summary_line("ttft pairs", results["ttft_pairs"]), flush=True)
    results["targets"] = targets(results)
    results["loadavg_end"] = os.getloadavg()
    print(table(results))
    print(json.dumps(results["targets"], indent=1))
    save(results, args.json)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
