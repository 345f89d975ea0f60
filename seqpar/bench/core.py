"""Engine-core benchmark: prefix reuse, chunked prefill, latency of running decodes, capacity.

    seqpar bench core [engine flags] [--strategy auto] [--doc-tokens 4096] [--long-tokens 8000]
                      [--chunk 512] [--kv-cache-gb 0.1] [--repeats 1] [--json out.json]
    python -m seqpar.bench.core --quick           # tiny sizes, a smoke test

(a) prefix reuse: a document then a second question about it; the second request's time to
    first token against the first's (its document blocks come from the prefix cache).
(b) chunked prefill: the same long prompt prefilled whole and in `--chunk`-token chunks
    (time to first token, no prefix caching); both must give the same first token. Its two
    engines serve (c) too: peak memory is over their life so far.
(c) a running request's inter-token latency while a long prompt arrives: with chunks of
    `--chunk` tokens each step carries a chunk beside the decode; without chunking one step
    carries the whole prefill. p50 / p99 / max of the gaps, against the chunk step time.
(d) capacity: the longest sequence one `--kv-cache-gb` per rank holds at SP 1..4 (from the
    block books; SP 3 and 4 oversubscribe 2 cores but capacity does not depend on speed), and
    one prompt longer than SP 1 holds, served at SP 2. Peak resident memory of each rank
    (VmHWM) is reported: model, cache and the transient buffers of a chunk.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import Any

from seqpar.bench.prompts import make_prompt
from seqpar.bench.report import add_json_arg, summary_line, write_json
from seqpar.engine.args import add_engine_args, engine_config
from seqpar.engine.llm_engine import LLMEngine
from seqpar.engine.outputs import RequestOutput
from seqpar.engine.sampling_params import SamplingParams

QUICK = dict(doc_tokens=200, long_tokens=400, chunk=64, capacity_kv_cache_gb=0.005)
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _engine(args: argparse.Namespace, sp: int, **over: Any) -> LLMEngine:
    return LLMEngine(engine_config(args, sp_size=sp, **over))


def _first_token(eng: LLMEngine, prompt: list[int]) -> RequestOutput:
    """One request alone in the engine, run to its first (and only) token."""
    rid = eng.add_request(prompt, SamplingParams(max_tokens=1, **GREEDY))
    while eng.has_unfinished():
        eng.step()
    out = eng.output(rid)
    eng.forget(rid)
    return out


def _peak_rss_mib(eng: LLMEngine) -> list[float]:
    peaks = []
    for pid in eng.rank_pids():
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        peaks.append(round(kb / 1024, 1))
    return peaks


def prefix_reuse(args: argparse.Namespace) -> dict[str, Any]:
    eng = _engine(args, args.sp_size)
    try:
        doc = make_prompt(eng.tokenizer, eng.model_config.vocab_size, args.doc_tokens, "text", seed=1)
        q1 = eng.tokenizer.encode(" Question: which record mentions Oslo?", add_special_tokens=False)
        q2 = eng.tokenizer.encode(" Question: what was built first?", add_special_tokens=False)
        first = _first_token(eng, doc + q1)
        second = _first_token(eng, doc + q2)
    finally:
        eng.shutdown()
    t1, t2 = first.metrics["time_to_first_token_s"], second.metrics["time_to_first_token_s"]
    return {
        "doc_tokens": len(doc),
        "first_ttft_s": t1,
        "second_ttft_s": t2,
        "ratio": t2 / t1,
        "second_cached_tokens": second.num_cached_tokens,
        "target": 0.15,
        "met": t2 / t1 <= 0.15,
    }


def _budget_engine(args: argparse.Namespace, budget: int) -> LLMEngine:
    """No prefix caching, and every prompt's chunk as large as the step budget (none capped)."""
    return _engine(
        args,
        args.sp_size,
        enable_prefix_caching=False,
        max_num_batched_tokens=budget,
        long_prefill_token_threshold=budget,
    )


def _budget_engines(args: argparse.Namespace, shared: dict[str, LLMEngine]) -> dict[str, LLMEngine]:
    """(b)'s and (c)'s two engines, "whole" and "chunked", built by whichever part comes first into
    `shared` (main shuts them down after the last of the two)."""
    if not shared:
        for name, budget in (("whole", args.long_tokens + 64), ("chunked", args.chunk)):
            shared[name] = _budget_engine(args, budget)
    return shared


def _shutdown(shared: dict[str, LLMEngine]) -> None:
    while shared:
        shared.popitem()[1].shutdown()


def chunked_prefill(args: argparse.Namespace, shared: dict[str, LLMEngine]) -> dict[str, Any]:
    """Both engines live side by side; rounds alternate which goes first; medians."""
    engines = _budget_engines(args, shared)
    runs: dict[str, dict[str, Any]] = {name: {"ttft_s_rounds": []} for name in engines}
    tok, vocab = engines["whole"].tokenizer, engines["whole"].model_config.vocab_size
    prompt = make_prompt(tok, vocab, args.long_tokens, "text", seed=2)
    for r in range(args.repeats):
        for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            out = _first_token(engines[name], prompt)
            runs[name]["ttft_s_rounds"].append(out.metrics["time_to_first_token_s"])
            runs[name]["token"] = out.outputs[0].token_ids[0]
    for name, eng in engines.items():
        runs[name]["ttft_s"] = statistics.median(runs[name]["ttft_s_rounds"])
        runs[name]["peak_rss_mib"] = _peak_rss_mib(eng)
    ratio = runs["chunked"]["ttft_s"] / runs["whole"]["ttft_s"]
    return {
        "prompt_tokens": args.long_tokens,
        "chunk": args.chunk,
        "repeats": args.repeats,
        **runs,
        "ratio": ratio,
        "target": 1.15,
        "met": ratio <= 1.15,
        "same_token": runs["chunked"]["token"] == runs["whole"]["token"],
    }


def decode_during_prefill(args: argparse.Namespace, shared: dict[str, LLMEngine]) -> dict[str, Any]:
    runs = {}
    for name, eng in _budget_engines(args, shared).items():
        short = eng.add_request(
            make_prompt(eng.tokenizer, eng.model_config.vocab_size, 64, "text", seed=3),
            SamplingParams(max_tokens=100_000, **GREEDY),
        )
        while short not in eng.step():
            pass
        for _ in range(3):
            eng.step()  # decoding steadily
        prompt = make_prompt(eng.tokenizer, eng.model_config.vocab_size, args.long_tokens, "text", seed=4)
        long = eng.add_request(prompt, SamplingParams(max_tokens=1, **GREEDY))
        stamps, steps, produced = [time.perf_counter()], [], []
        while long not in produced:  # its one token ends it
            t0 = time.perf_counter()
            produced = eng.step()
            steps.append(time.perf_counter() - t0)
            if short in produced:
                stamps.append(time.perf_counter())
        eng.abort([short])
        for rid in (short, long):  # the engine may serve (b) next
            eng.forget(rid)
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        runs[name] = {
            "gaps": len(gaps),
            "itl_p50_s": statistics.median(gaps),
            "itl_p99_s": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
            "itl_max_s": gaps[-1],
            "max_step_s": max(steps),
            "prefill_steps": len(steps),
        }
    return {
        "prompt_tokens": args.long_tokens,
        "chunk": args.chunk,
        **runs,
        "met": runs["chunked"]["itl_p99_s"] <= runs["chunked"]["max_step_s"] * 1.05,
    }


def capacity(args: argparse.Namespace) -> dict[str, Any]:
    from seqpar.engine.llm_engine import kv_blocks_per_rank
    from seqpar.model import load_config

    mc = load_config(args.model)
    out: dict[str, Any] = {"kv_cache_gb": args.capacity_kv_cache_gb, "tokens": {}}
    for sp in (1, 2, 3, 4):
        config = engine_config(args, sp_size=sp, kv_cache_gb=args.capacity_kv_cache_gb)
        out["tokens"][sp] = config.placement().max_tokens(kv_blocks_per_rank(config, mc))
    one = out["tokens"][1]
    out["growth"] = {sp: n / one for sp, n in out["tokens"].items()}
    out["met"] = all(out["growth"][sp] >= 0.95 * sp for sp in (1, 2, 3, 4))
    # A prompt SP 1 refuses, served at SP 2.
    n = min(int(one * 1.5), mc.max_position_embeddings - 2)
    eng = _engine(args, 2, kv_cache_gb=args.capacity_kv_cache_gb)
    try:
        prompt = make_prompt(eng.tokenizer, mc.vocab_size, n, "text", seed=5)
        res = _first_token(eng, prompt)
        out["served_at_sp2"] = {
            "prompt_tokens": n,
            "ttft_s": res.metrics["time_to_first_token_s"],
            "kv_bytes_per_rank": res.metrics["kv_cache_bytes_per_rank"],
            "peak_rss_mib": _peak_rss_mib(eng),
        }
    finally:
        eng.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqpar bench core", description=__doc__.split("\n\n")[0])
    add_engine_args(p.add_argument_group("engine"), defaults={"sp_size": 2})
    p.add_argument("--doc-tokens", type=int, default=4096)
    p.add_argument("--long-tokens", type=int, default=8000)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--capacity-kv-cache-gb", type=float, default=0.1, help="(d): KV cache per rank, GiB")
    p.add_argument("--parts", default="a,b,c,d", help="which of a,b,c,d to run")
    p.add_argument("--repeats", type=int, default=1, help="(b): rounds, alternating which engine goes first; medians")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    add_json_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    shared: dict[str, LLMEngine] = {}  # (b)'s and (c)'s engines
    parts = {
        "a": ("prefix_reuse", prefix_reuse),
        "b": ("chunked_prefill", functools.partial(chunked_prefill, shared=shared)),
        "c": ("decode_during_prefill", functools.partial(decode_during_prefill, shared=shared)),
        "d": ("capacity", capacity),
    }
    results: dict[str, Any] = {"args": vars(args)}
    keys = args.parts.split(",")
    try:
        for i, key in enumerate(keys):
            name, fn = parts[key]
            results[name] = fn(args)
            print(summary_line(name, results[name], skip=()), flush=True)
            if not {"b", "c"} & set(keys[i + 1 :]):
                _shutdown(shared)  # no later part needs them
    finally:
        _shutdown(shared)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
