"""Engine benchmark: the whole engine, end to end, at SP 1 and SP 2 against HF transformers.

    seqpar bench engine [engine flags] [--prompt-tokens 8192] [--decode-contexts 1024,8192]
                        [--decode-tokens 32] [--repeats 3] [--json out.json]
    python -m seqpar.bench.engine --quick            # tiny sizes, a smoke test

Every configuration gets the same deterministic prompt (token ids from the model's
tokenizer on generated text, or with `--prompt random` a fixed pseudo-random id
sequence) and runs greedy (temperature 0). Configurations (fp32):

- `sp1-1t`: LLM(model, sp_size=1, num_threads=1);
- `sp2`: LLM(model, sp_size=2, num_threads=1) = 2 ranks x 1 thread, ring prefill over
  snake shards, decode merge allgather; `sp2-alltoall`, `sp2-tree`: the same with the
  other decode merges (decode only);
- `sp1-2t`: LLM(model, sp_size=1, num_threads=2), the fair single-process baseline;
- `hf-2t`: transformers' LlamaForCausalLM (sdpa attention) built from the same weights,
  `torch.set_num_threads(2)`, one forward over the prompt (use_cache=True, logits of the
  last token only: the prefill of `generate`), in its own process;
- `vllm` (only with `--vllm-python`): vLLM's CPU build on every core, in its own Python
  environment (seqpar.bench.vllm_baseline); its tokens are compared with seqpar's for
  information only (it may run another dtype), not for the exit status.

Engines are built (and warmed up on a short prompt) before anything is timed, and stay
up for the whole run, so start-up is excluded and every measurement round visits every
configuration, in an order that rotates each round: drift of a noisy machine hits all
alike. Figures are medians over `--repeats` rounds.

Measured:
1. time to first token of the prompt: `generate(prompt, SamplingParams(max_tokens=1,
   temperature=0))`, as the engine's `metrics["time_to_first_token_s"]` and as the wall
   time of the call (which adds the final cache-free round trip);
2. decode ms/token at each `--decode-contexts` context: `--decode-tokens` tokens with
   ignore_eos, from `metrics["decode_tokens_per_s"]`;
3. KV-cache bytes per rank after prefill (`metrics["kv_cache_bytes_per_rank"]`) and bytes
   each SP rank sent per prefill and per decoded token (`StepResult.comm_bytes` of every
   step, recorded as the driver receives it);
4. exactness: SP 2 greedy tokens must equal SP 1's (and the first token every
   configuration's, transformers' included). A mismatch makes the exit status 1.

The model's context bounds the prompt: a prompt must leave room for one generated token,
so `--prompt-tokens` is capped at context - 1 and a decode context at context -
`--decode-tokens` (the table shows the prompt lengths actually run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from typing import Any

import torch

from seqpar.bench import vllm_baseline
from seqpar.bench.engine.report import format_report, summarize
from seqpar.bench.engine.rows import Config, build_configs
from seqpar.bench.engine.runner import log, run_benchmark
from seqpar.bench.report import add_json_arg, run_config, write_json
from seqpar.engine.args import ENGINE_FIELDS, add_engine_args, engine_kwargs
from seqpar.strategies.decode import MERGES as DECODE_MERGES

QUICK = dict(prompt_tokens=192, decode_contexts="64,160", decode_tokens=4, repeats=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="seqpar bench engine",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_args(
        p.add_argument_group(
            "engine (every configuration; each sets its own SP size, threads, decode merge, KV cache)"
        ),
        defaults={"strategy": "ring", "enable_prefix_caching": False},
        only=[f for f in ENGINE_FIELDS if f not in ("sp_size", "num_threads", "decode_merge", "kv_cache_gb")],
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        metavar="N",
        help="prompt length for time to first token (default: 8192, capped at the model's context - 1)",
    )
    p.add_argument(
        "--decode-contexts",
        default=None,
        metavar="C1,C2",
        help="contexts at which decode is timed (default: 1024,8192)",
    )
    p.add_argument("--decode-tokens", type=int, default=None, metavar="K", help="tokens decoded per run (default: 32)")
    p.add_argument(
        "--repeats", type=int, default=None, metavar="R", help="measurement rounds; medians reported (default: 3)"
    )
    p.add_argument(
        "--merges",
        default=",".join(DECODE_MERGES),
        metavar="M1,M2",
        help="decode merges timed at SP 2, the first also used for SP 2's TTFT (default: %(default)s; '' = no decode)",
    )
    p.add_argument(
        "--prompt",
        choices=("text", "random"),
        default="text",
        help="token ids from the tokenizer on generated text, or pseudo-random ids (default: %(default)s)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--decode-only", action="store_true", help="time decode only (no TTFT rounds, no transformers)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (a smoke test): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + ", shard_blocks=2",
    )
    add_json_arg(p, help="write every sample and the summary as JSON")
    vllm_baseline.add_arguments(p)
    args = p.parse_args(argv)
    try:
        args.engine = engine_kwargs(args)  # the seqpar side; transformers gets the same model and RoPE scaling
    except ValueError as e:
        p.error(str(e))
    vllm_baseline.check_arguments(p, args)
    defaults = (
        QUICK if args.quick else dict(prompt_tokens=8192, decode_contexts="1024,8192", decode_tokens=32, repeats=3)
    )
    if args.quick:
        args.engine["shard_blocks"] = 2
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.decode_contexts = [int(c) for c in str(args.decode_contexts).split(",") if c.strip()]
    except ValueError:
        p.error(f"--decode-contexts must be comma-separated integers, got {args.decode_contexts!r}")
    merges = [m for m in args.merges.split(",") if m]
    bad = [m for m in merges if m not in DECODE_MERGES]
    if bad:
        p.error(f"unknown decode merge(s) {', '.join(bad)}; choose from {', '.join(DECODE_MERGES)}")
    args.merges = merges
    if not args.merges:
        args.decode_contexts = []
    for name in ("prompt_tokens", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.decode_tokens < 2 and args.decode_contexts:
        p.error("--decode-tokens must be >= 2 to time decode")
    if any(c < 1 for c in args.decode_contexts):
        p.error("--decode-contexts must be positive")
    return args


def machine() -> dict[str, Any]:
    info = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:  # the code measured, when run from a checkout
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = build_configs(args.merges)
    if args.vllm_python:
        # first: a vLLM that cannot start fails the run before seqpar's engines are built
        configs.insert(0, Config("vllm", f"vLLM CPU, {args.vllm_dtype}", 1, os.cpu_count() or 1))
    if args.decode_only:
        configs = [dataclasses.replace(c, ttft=False) for c in configs if c.decode]
        args.no_hf = True
    info = machine()
    header = (
        f"seqpar engine benchmark: model {args.model}, {args.dtype}, greedy; {args.repeats} round(s); "
        f"{info['cpus']} CPUs ({info.get('cpu') or platform.machine()}), torch {info['torch']}"
        + (f", commit {info['commit']}" if info.get("commit") else "")
    )
    log(header)
    try:
        res = run_benchmark(args, configs)
    except vllm_baseline.VLLMUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = summarize(res, configs, args)
    print(f"\n{header}\n")
    print(format_report(s, res, args))
    if args.json:
        payload = {
            "config": run_config(args),
            "machine": info,
            "prompt_tokens": res.prompt_tokens,
            "decode_prompt_tokens": res.decode_prompt_tokens,
            "summary": s,
            "raw": {"ttft": res.ttft, "hf": res.hf, "decode": {str(k): v for k, v in res.decode.items()}},
            "hf_error": res.hf_error,
            "skipped": res.skipped,
        }
        write_json(args.json, payload)
    return 0 if all(s["exact"].values()) else 1
