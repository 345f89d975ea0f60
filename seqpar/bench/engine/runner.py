"""The engine benchmark's run: seqpar engines and the transformers baseline kept up, rounds rotated."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from seqpar.bench import vllm_baseline
from seqpar.bench.engine.rows import Config
from seqpar.bench.prompts import make_prompt
from seqpar.engine.outputs import StepRecord
from seqpar.model import hf_model_from

# ---------------------------------------------------------------- seqpar engines


@dataclass
class Call:
    kind: str  # prefill (the step carries prompt tokens) | decode
    wall_s: float
    comm_bytes: list[int]


class Engine:
    """One LLM kept up for the whole run; every step is recorded through the engine's observer hook."""

    def __init__(self, config: Config, engine: dict[str, Any], kv_cache_gb: float):
        """`engine`: the EngineConfig fields every configuration shares (prefix caching off by default:
        every round must prefill the same prompt from scratch)."""
        from seqpar.engine.llm import LLM

        self.config = config
        self.llm = LLM(
            **engine,
            sp_size=config.sp,
            decode_merge=config.decode_merge,
            num_threads=config.threads,
            kv_cache_gb=kv_cache_gb,
        )
        self.calls: list[Call] = []

        def record(step: StepRecord) -> None:
            self.calls.append(Call("decode" if step.decode_only else "prefill", step.seconds, step.comm_bytes))

        self.llm.engine.observers.append(record)

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def run(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        from seqpar.engine.sampling_params import SamplingParams

        self.calls = []
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        out = self.llm.generate(prompt, params)[0]
        wall = time.perf_counter() - t0
        prefill = [c for c in self.calls if c.kind == "prefill"]
        decode = [c for c in self.calls if c.kind == "decode"]
        m = out.metrics
        return {
            "wall_s": wall,
            "ttft_s": m["time_to_first_token_s"],
            "decode_tokens_per_s": m["decode_tokens_per_s"],
            "kv_bytes_after_prefill": m["kv_cache_bytes_per_rank"] if max_tokens == 1 else None,
            "prefill_comm_bytes": [sum(b) for b in zip(*(c.comm_bytes for c in prefill))] if prefill else None,
            "prefill_step_s": sum(c.wall_s for c in prefill) if prefill else None,
            "decode_comm_bytes": [c.comm_bytes for c in decode],
            "decode_step_s": [c.wall_s for c in decode],
            "tokens": list(out.outputs[0].token_ids),
        }

    def shutdown(self) -> None:
        self.llm.shutdown()


def kv_cache_gb_for(model_config: Any, sp: int, tokens: int, block_size: int = 16) -> float:
    """A cache just big enough for one sequence of `tokens` (at least the model's context) on each rank."""
    from seqpar.engine.kv_cache import block_bytes
    from seqpar.engine.placement import Placement

    per_block = block_bytes(
        model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, torch.float32, block_size
    )
    need = Placement(sp, block_size).blocks_per_rank(max(tokens, model_config.max_position_embeddings))
    return (max(need) + 4) * per_block / 2**30


def _hf_server(model: str, threads: int, conn: Any, rope_scaling: dict | None = None) -> None:
    """In its own process: build the HF model, then time one prefill forward per prompt received."""
    try:
        torch.set_num_threads(threads)
        hf = hf_model_from(model, rope_scaling)
        conn.send(("ok", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            prompt = conn.recv()
        except EOFError:
            return
        if prompt is None:
            return
        try:
            ids = torch.tensor([prompt], dtype=torch.long)
            with torch.inference_mode():
                t0 = time.perf_counter()
                logits = hf(ids, use_cache=True, logits_to_keep=1).logits[0, -1]
                elapsed = time.perf_counter() - t0
            conn.send(("ok", (elapsed, int(logits.argmax()))))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class HFBaseline:
    def __init__(self, model: str, threads: int, rope_scaling: dict | None = None):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_hf_server, args=(model, threads, child, rope_scaling), name="hf-baseline", daemon=True
        )
        self.proc.start()
        self._answer(600.0)

    def _answer(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError("the transformers baseline process did not answer")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"the transformers baseline failed:\n{value}")
        return value

    def run(self, prompt: list[int]) -> tuple[float, int]:
        self.conn.send(prompt)
        return self._answer(3600.0)

    def shutdown(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


# ---------------------------------------------------------------- the run


@dataclass
class Results:
    prompt_tokens: int = 0
    decode_prompt_tokens: dict[int, int] = field(default_factory=dict)  # requested context -> prompt run
    ttft: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # config key -> per round
    hf: list[tuple[float, int]] = field(default_factory=list)
    hf_error: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # config key -> why it could not run
    decode: dict[int, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)  # context -> key -> rounds


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rotated(items: list[Any], r: int) -> list[Any]:
    if not items:
        return items
    r %= len(items)
    return items[r:] + items[:r]


def log(msg: str) -> None:
    print(f"[bench engine] {msg}", file=sys.stderr, flush=True)


def run_benchmark(args: argparse.Namespace, configs: list[Config]) -> Results:
    from seqpar.model import load_config, load_tokenizer

    rope_scaling = args.engine["rope_scaling"]
    mc = load_config(args.model, rope_scaling)
    tokenizer = load_tokenizer(args.model)
    context = mc.max_position_embeddings
    res = Results()
    res.prompt_tokens = min(args.prompt_tokens, context - 1)
    contexts = args.decode_contexts
    for c in contexts:
        res.decode_prompt_tokens[c] = max(1, min(c, context - args.decode_tokens))
    longest = max([res.prompt_tokens, *(p + args.decode_tokens for p in res.decode_prompt_tokens.values())])
    base = make_prompt(tokenizer, mc.vocab_size, longest, args.prompt)
    prompt = base[: res.prompt_tokens]
    warm = base[: min(256, res.prompt_tokens)]

    engines: dict[str, Any] = {}  # seqpar Engines, and the vLLM baseline
    hf: HFBaseline | None = None
    try:
        for c in configs:
            t0 = time.perf_counter()
            if c.key == "vllm":
                engines[c.key] = vllm_baseline.start(args, context, log)
                continue
            try:
                engines[c.key] = Engine(c, args.engine, kv_cache_gb_for(mc, c.sp, longest))
            except ValueError as e:  # e.g. a decode merge this model's head count rules out
                if c.ttft:
                    raise
                res.skipped[c.key] = str(e)
                log(f"{c.key}: skipped: {e}")
                continue
            engines[c.key].run(warm, 2)  # warm-up, not timed
            log(f"{c.key}: up in {time.perf_counter() - t0:.1f}s")
        if not args.no_hf:
            try:
                t0 = time.perf_counter()
                hf = HFBaseline(args.model, 2, rope_scaling)
                hf.run(warm)
                log(f"hf-2t: up in {time.perf_counter() - t0:.1f}s")
            except Exception as e:  # reported, the rest still runs
                res.hf_error = f"{type(e).__name__}: {e}"
                log(f"transformers baseline unavailable: {res.hf_error}")
                hf = None

        ttft_keys = [c.key for c in configs if c.ttft] + (["hf-2t"] if hf is not None else [])
        for r in range(args.repeats):
            for key in rotated(ttft_keys, r):
                if key == "hf-2t":
                    res.hf.append(hf.run(prompt))
                    log(f"TTFT round {r + 1}: hf-2t {res.hf[-1][0]:.3f}s")
                    continue
                run = engines[key].run(prompt, 1)
                res.ttft.setdefault(key, []).append(run)
                log(f"TTFT round {r + 1}: {key} {run['ttft_s']:.3f}s (wall {run['wall_s']:.3f}s)")

        decode_keys = [c.key for c in configs if c.decode and c.key in engines]
        for ctx in contexts:
            p = base[: res.decode_prompt_tokens[ctx]]
            for r in range(args.repeats):
                for key in rotated(decode_keys, r):
                    run = engines[key].run(p, args.decode_tokens)
                    res.decode.setdefault(ctx, {}).setdefault(key, []).append(run)
                    rate = run["decode_tokens_per_s"]
                    log(f"decode {ctx} round {r + 1}: {key} {'n/a' if not rate else f'{1000 / rate:.1f} ms/token'}")
    finally:
        for e in engines.values():
            e.shutdown()
        if hf is not None:
            hf.shutdown()
    return res
