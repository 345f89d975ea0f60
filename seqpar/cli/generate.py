"""`seqpar generate`: one prompt, streamed to stdout with a summary on stderr (or one JSON object).

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR set) rank 0 is the driver and
prints; the other ranks serve model steps until rank 0 stops them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from seqpar.cli.errors import CLIError, fail
from seqpar.cli.torchrun import run_under_torchrun, under_torchrun
from seqpar.engine.args import add_engine_args, engine_config
from seqpar.engine.config import EngineConfig
from seqpar.engine.executor import EngineDeadError
from seqpar.engine.sampling_params import SamplingParams


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate from one prompt",
        description=(
            "Generate from one prompt with the KV cache sharded over --sp ranks. Streams the answer to stdout and "
            "prints prompt tokens, time to first token, decode tokens/s and KV bytes per rank to stderr. Under "
            "torchrun, run one process per rank: torchrun --nproc-per-node N -m seqpar generate --sp N ..."
        ),
    )
    add_engine_args(gen.add_argument_group("engine"), torchrun=True)
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
    req.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, figures) instead")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,  # the engine's --seed, which for one request is the request's
        max_tokens=args.max_tokens,
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


def make_llm(config: EngineConfig, torchrun: bool = False) -> Any:
    from seqpar.engine.llm import LLM

    return LLM(config, torchrun=torchrun)


def run(args: argparse.Namespace) -> int:
    if under_torchrun():
        return run_under_torchrun(args, _drive(args), check_args=lambda: sampling_params(args), prepare=_prepare(args))
    config = engine_config(args)
    sampling_params(args)  # bad input fails before the model loads
    text = read_prompt(args)
    with make_llm(config) as llm:
        run_request(llm, args, text)
    return 0


def _prepare(args: argparse.Namespace) -> Any:
    def prepare(config: EngineConfig) -> str:
        from seqpar.engine.tokenizer import LazyTokenizer

        text = read_prompt(args)
        LazyTokenizer(config.model).get("a text prompt")
        return text

    return prepare


def _drive(args: argparse.Namespace) -> Any:
    def drive(config: EngineConfig, text: str) -> int:
        try:
            with make_llm(config, torchrun=True) as llm:
                run_request(llm, args, text)
        except (ValueError, EngineDeadError) as e:
            return fail(e)
        return 0

    return drive
