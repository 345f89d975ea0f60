"""The `seqpar` command line.

    seqpar generate --sp 2 --prompt "The capital of France is" --max-tokens 16
    seqpar serve --sp 2 --port 8000 [--api-key KEY]    # an OpenAI-compatible server
    torchrun --nproc-per-node 2 -m seqpar generate --sp 2 --prompt ...   # one rank per process
    seqpar bench attention [...]      seqpar bench engine [...]      seqpar bench auto [...]
    seqpar tune                       # measure this machine for --strategy auto
    seqpar demo [--sp 2]

`generate` streams the answer to stdout and a summary to stderr; with `--json` it
prints one JSON object instead. Bad input exits 2 with one `seqpar: error:` line.
Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR set) rank 0 is the driver
and prints; the other ranks serve model steps until rank 0 stops them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any

from seqpar.engine.config import DECODE_MERGES, DEVICES, PREFILL_STRATEGIES, EngineConfig
from seqpar.engine.executor import EngineDeadError
from seqpar.engine.kv_cache import SHARD_SCHEMES
from seqpar.engine.sampling import SamplingParams

BENCHES = ("attention", "engine", "core", "decode", "serve", "auto")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
# EngineConfig field -> the flag that sets it, so an engine error names what the user typed.
ENGINE_FLAGS = {
    "sp_size": "--sp",
    "tp_size": "--tp",
    **{
        name: "--" + name.replace("_", "-")
        for name in (
            "model",
            "strategy",
            "decode_merge",
            "scheme",
            "shard_blocks",
            "block_size",
            "max_num_batched_tokens",
            "kv_cache_gb",
            "num_threads",
            "max_model_len",
            "max_num_seqs",
            "rope_scaling",
        )
    },
}


class CLIError(ValueError):
    """Bad command-line input, reported as one line."""


# ---- arguments --------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpar", description="Exact sequence-parallel long-context LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,serve,bench,demo,plan,tune}")

    gen = sub.add_parser(
        "generate",
        help="generate from one prompt",
        description=(
            "Generate from one prompt with the KV cache sharded over --sp ranks. Streams the answer to stdout and "
            "prints prompt tokens, time to first token, decode tokens/s and KV bytes per rank to stderr. Under "
            "torchrun, run one process per rank: torchrun --nproc-per-node N -m seqpar generate --sp N ..."
        ),
    )
    add_engine_args(gen.add_argument_group("engine"))
    req = gen.add_argument_group("request")
    src = req.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file ('-' = stdin)")
    req.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template"
    )
    req.add_argument("--max-tokens", type=int, default=64, metavar="K", help="tokens to generate at most (default: 64)")
    req.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default: 1)")
    req.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1 = off)")
    req.add_argument(
        "--top-k", type=int, default=-1, metavar="K", help="sample among the K likeliest (default: -1 = off)"
    )
    req.add_argument("--seed", type=int, default=None, metavar="S", help="seed of this request's sampling")
    req.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, figures) instead")

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

    demo = sub.add_parser(
        "demo",
        help="find a needle in a ~4K-token document at SP 2",
        description=(
            "SmolLM2-135M-Instruct answers a question whose answer is hidden mid-way through a ~4K-token document, "
            "with the prompt sharded over --sp ranks; prints the answer and the figures."
        ),
    )
    demo.add_argument("--sp", type=int, default=2, metavar="N", help="sequence-parallel ranks (default: 2)")

    from seqpar.server.launch import add_serve_args

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server",
        description=(
            "Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, ...). "
            "Under torchrun, rank 0 serves HTTP: torchrun --nproc-per-node N -m seqpar serve --sp N ..."
        ),
    )
    add_engine_args(serve.add_argument_group("engine"))
    add_serve_args(serve.add_argument_group("server"))

    from seqpar.costmodel.command import add_plan_args

    add_plan_args(
        sub.add_parser(
            "plan",
            help="predict prefill, decode and memory of every layout of a cluster",
            description="Predicted TTFT, decode ms/token, KV bytes per rank and longest context "
            "of every layout (TP inside a node x CP across nodes) and strategy; "
            "marks the chosen one.",
        )
    )
    from seqpar.costmodel.tune import add_tune_args

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


def add_engine_args(eng: Any) -> None:
    """The engine flags, shared by `generate` and `serve`."""
    eng.add_argument(
        "--model", default="smollm2-135m", help="known model name, GGUF file or HF directory (default: %(default)s)"
    )
    eng.add_argument(
        "--sp",
        type=int,
        default=None,
        metavar="N",
        help="sequence-parallel ranks (default: 1; under torchrun WORLD_SIZE / tp)",
    )
    eng.add_argument("--tp", type=int, default=1, metavar="K", help="tensor-parallel ranks per SP rank (default: 1)")
    eng.add_argument(
        "--strategy",
        default="auto",
        choices=PREFILL_STRATEGIES,
        help="prefill attention across SP ranks; auto: each step the cheapest by the cost model over this "
        "machine's profile (seqpar tune) (default: auto)",
    )
    eng.add_argument(
        "--decode-merge", default="allgather", choices=DECODE_MERGES, help="how decode merges partial attention"
    )
    eng.add_argument(
        "--scheme",
        default="zigzag",
        choices=SHARD_SCHEMES,
        help="how positions are spread over SP ranks, in units of --shard-blocks KV blocks (default: zigzag)",
    )
    eng.add_argument(
        "--shard-blocks",
        type=int,
        default=16,
        metavar="B",
        help="KV blocks per shard unit: consecutive positions one SP rank holds (default: 16)",
    )
    eng.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block (default: 16)")
    eng.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of cached prompt prefixes (default: on)",
    )
    eng.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        metavar="N",
        help="tokens per step across the SP group; longer prompts prefill in chunks (default: 2048)",
    )
    eng.add_argument("--kv-cache-gb", type=float, default=1.0, metavar="G", help="KV cache per rank, GiB (default: 1)")
    eng.add_argument(
        "--num-threads", type=int, default=None, metavar="T", help="threads per rank (default: cores / ranks)"
    )
    eng.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="L",
        help="tokens per sequence at most, prompt + output (default: the model's context)",
    )
    eng.add_argument(
        "--max-num-seqs", type=int, default=64, metavar="S", help="requests in one batch at most (default: 64)"
    )
    eng.add_argument(
        "--decode-split",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode-only steps split the MLP over the SP ranks (default: on)",
    )
    eng.add_argument(
        "--shared-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode merges, pass-KV and pass-Q between ranks on one host through shared memory (default: on; "
        "--no-shared-memory sends everything over the process group, as between hosts)",
    )
    eng.add_argument(
        "--device",
        default="cpu",
        choices=DEVICES,
        help="where ranks keep the model and KV cache: cpu (gloo) or cuda (NCCL, one GPU per rank; "
        "written but not yet verified on a GPU: see scripts/gpu_check.sh) (default: cpu)",
    )
    eng.add_argument(
        "--rope-scaling",
        default=None,
        metavar="JSON",
        help='replace the model\'s RoPE scaling, e.g. \'{"rope_type":"yarn","factor":4,'
        '"original_max_position_embeddings":8192}\' (the context grows by the factor)',
    )


def engine_config(args: argparse.Namespace, world: int | None = None) -> EngineConfig:
    """The EngineConfig `args` ask for; `world` = WORLD_SIZE under torchrun, which it must match."""
    sp = args.sp if args.sp is not None else (world // args.tp if world and args.tp > 0 else 1)
    config = EngineConfig(
        model=args.model,
        sp_size=sp,
        tp_size=args.tp,
        strategy=args.strategy,
        decode_merge=args.decode_merge,
        scheme=args.scheme,
        shard_blocks=args.shard_blocks,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gb=args.kv_cache_gb,
        num_threads=args.num_threads,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        shared_memory=args.shared_memory,
        rope_scaling=rope_scaling_arg(args.rope_scaling),
        decode_split=args.decode_split,
        device=args.device,
    )
    if world is not None and config.world_size != world:
        raise CLIError(
            f"--sp {config.sp_size} x --tp {config.tp_size} = {config.world_size} ranks, but torchrun "
            f"started WORLD_SIZE={world} processes; make them equal"
        )
    return config


def rope_scaling_arg(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CLIError(f'--rope-scaling is not JSON ({e}); e.g. \'{{"rope_type":"yarn","factor":4}}\'') from e
    if not isinstance(value, dict):
        raise CLIError(f"--rope-scaling must be a JSON object, got {text!r}")
    return value


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens
    )


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        text = args.prompt
    else:
        try:
            if args.prompt_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.prompt_file, encoding="utf-8") as f:
                    text = f.read()
        except OSError as e:
            raise CLIError(f"cannot read --prompt-file {args.prompt_file!r}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise CLIError(f"--prompt-file {args.prompt_file!r} is not UTF-8 text: {e}") from e
    if not text.strip():
        raise CLIError("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


# ---- generate ---------------------------------------------------------------------
class PrefillBar:
    """`on_progress(layers_done, num_layers)` for LLM.stream: a tqdm bar on stderr while the prompt is prefilled."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, layers_done: int, num_layers: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=num_layers, desc="prefill", unit="layer", leave=False, file=sys.stderr)
        self.bar.update(layers_done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> PrefillBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_request(llm: Any, args: argparse.Namespace, text: str) -> None:
    """Generate for one prompt: stream it with a prefill progress bar, or print JSON."""
    prompt = llm.chat_prompt([{"role": "user", "content": text}]) if args.chat else text
    params = sampling_params(args)
    if args.json:
        out = llm.generate(prompt, params)[0]
        done = out.outputs[0]
        print(
            json.dumps(
                {"text": done.text, "token_ids": done.token_ids, "finish_reason": done.finish_reason, **out.metrics}
            )
        )
        return
    last = ""
    with PrefillBar() as bar:
        for delta in llm.stream(prompt, params, on_progress=bar):
            bar.close()  # the first delta comes with the first token: prefill is done
            if delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
                last = delta
    if not last.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    print(summary(llm.last_output), file=sys.stderr)


def summary(out: Any) -> str:
    m = out.metrics
    rate = m["decode_tokens_per_s"]
    kv = m["kv_cache_bytes_per_rank"] or []
    return "\n".join(
        [
            f"prompt tokens        {m['prompt_tokens']}",
            f"output tokens        {m['output_tokens']} (finish: {out.outputs[0].finish_reason})",
            f"time to first token  {m['time_to_first_token_s']:.3f} s",
            f"decode               {'n/a (one token)' if rate is None else f'{rate:.2f} tokens/s'}",
            f"KV cache per rank    {', '.join(f'{b / 2**20:.2f} MiB' for b in kv)} ({len(kv)} SP ranks)",
        ]
    )


def generate(args: argparse.Namespace) -> int:
    config = engine_config(args)
    sampling_params(args)  # bad input fails before the model loads
    text = read_prompt(args)
    with make_llm(config) as llm:
        run_request(llm, args, text)
    return 0


def make_llm(config: EngineConfig, torchrun: bool = False) -> Any:
    from seqpar.engine.llm import LLM

    return LLM(torchrun=torchrun, **dataclasses.asdict(config))


def num_blocks(config: EngineConfig) -> int:
    """KV blocks per rank, as the driver computes them (every torchrun rank needs the number)."""
    from seqpar.engine.llm_engine import kv_blocks_per_rank
    from seqpar.model import load_config

    return kv_blocks_per_rank(config, load_config(config.model), local=False)


def generate_torchrun(args: argparse.Namespace) -> int:
    """One torchrun process: rank 0 drives the engine and prints, the others serve steps."""
    import torch
    import torch.distributed as dist

    from seqpar.comm.launch import join_group
    from seqpar.engine.executor import serve_rank
    from seqpar.engine.tokenizer import LazyTokenizer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Checks of argv alone give every rank the same verdict: only rank 0 says it.
    try:
        config = engine_config(args, world)
        sampling_params(args)
    except ValueError as e:
        return fail(e) if rank == 0 else 2
    torch.set_num_threads(config.threads_per_rank)
    join_group(config.device, int(os.environ.get("LOCAL_RANK", 0)), config.step_timeout_s)  # gloo, or NCCL
    try:
        # Checks that depend on this machine (model files, the prompt file on rank 0) may differ
        # between ranks: agree on them before any rank starts loading, so none waits forever.
        error, text, blocks = None, "", 0
        try:
            blocks = num_blocks(config)
            if rank == 0:
                text = read_prompt(args)
                LazyTokenizer(config.model).get("a text prompt")
        except ValueError as e:
            error = f"rank {rank}: {e}" if rank else str(e)
        errors: list[str | None] = [None] * world
        dist.all_gather_object(errors, error)
        failed = [e for e in errors if e]
        if failed:
            return fail(failed[0]) if rank == 0 else 2
        if rank != 0:
            try:
                # until rank 0's LLM.shutdown() broadcasts the stop; False: rank 0 reports the failed start
                return 0 if serve_rank(config, blocks) else 2
            except Exception as e:  # a failed step; rank 0 sees this rank gone
                return fail(f"rank {rank}: {type(e).__name__}: {e}")
        try:
            with make_llm(config, torchrun=True) as llm:
                run_request(llm, args, text)
        except (ValueError, EngineDeadError) as e:
            return fail(e)
        return 0
    finally:
        dist.destroy_process_group()


# ---- bench, demo, main -------------------------------------------------------------
def bench(name: str, argv: list[str]) -> int:
    import importlib

    module_name = f"seqpar.bench.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return fail(f"benchmark {name!r} is not available in this version of seqpar")
    return module.main(argv) or 0


def with_flag_names(text: str) -> str:
    """`kv_cache_gb=0.001 gives ...` -> `--kv-cache-gb 0.001 gives ...`: the engine's settings as the CLI's flags."""
    return re.sub(r"\b([a-z_]+)=", lambda m: f"{ENGINE_FLAGS[m[1]]} " if m[1] in ENGINE_FLAGS else m[0], text)


def fail(error: BaseException | str) -> int:
    """Print one error line (for a failed rank: its first line and its exception) and return 2."""
    lines = [ln for ln in with_flag_names(str(error)).strip().splitlines() if ln.strip()] or [type(error).__name__]
    msg = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
    print(f"seqpar: error: {msg}", file=sys.stderr)
    return 2


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A benchmark parses its own arguments (its --help included): hand them over untouched.
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        return bench(argv[1], argv[2:])
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench(args.name, args.args)
    try:
        if args.command == "demo":
            if under_torchrun():
                raise CLIError("seqpar demo starts its own ranks; run it without torchrun")
            from seqpar import demo

            return demo.main(sp_size=args.sp)
        if args.command == "plan":
            from seqpar.costmodel.command import run_plan

            return run_plan(args)
        if args.command == "tune":
            from seqpar.costmodel.tune import run_tune

            return run_tune(args)
        if args.command == "serve":
            from seqpar.server.launch import serve

            return serve(args)
        if under_torchrun():
            return generate_torchrun(args)
        return generate(args)
    except (ValueError, EngineDeadError) as e:  # ModelLoadError and ConfigError are ValueErrors
        return fail(e)
    except KeyboardInterrupt:
        print("seqpar: interrupted", file=sys.stderr)
        return 130
