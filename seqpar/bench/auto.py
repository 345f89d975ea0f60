"""Does `strategy="auto"` pick a fast strategy? And does the cost model predict prefill time?

    seqpar bench auto [engine flags] [--new 16,128,512,2048] [--cached 0,512,2048,6000]
                      [--repeats 3] [--prefill 2048,4096,8000] [--parts grid,prefill] [--rope-scaling JSON]
                      [--num-threads T] [--json out.json]
    seqpar bench auto --quick          # tiny sizes, a smoke test

grid: one engine at `--sp` runs every strategy (ring, pass_q, allgather, and auto's own choice)
in turn, so slow drifts of the machine hit every strategy alike. For each cached length C a prefix of
C tokens is prefilled once per engine; then each step prefills N new tokens over it (a fresh
suffix each repeat, so only the prefix comes from the cache). The step's time is the engine's own
(its observer: the ranks' compute and communication, no scheduling). Per point: the fastest
strategy measured (median over repeats), auto's pick and its measured time, and whether that is
within 10% of the fastest; Meta's pass-KV / pass-Q rule is shown beside it.

prefill: one whole prompt of T tokens in one step at SP 1 and at `--sp`, under auto; the step's
measured time against the cost model's prediction for the strategy auto chose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from seqpar.bench.prompts import make_prompt
from seqpar.engine.args import add_engine_args, engine_config
from seqpar.engine.config import EngineConfig
from seqpar.engine.llm_engine import LLMEngine
from seqpar.engine.sampling_params import SamplingParams
from seqpar.strategies.over_cache import pass_kv_for_meta
from seqpar.strategies.registry import over_cache_names

STRATEGIES = (*over_cache_names(), "auto")  # every engine strategy, then auto's pick
ONE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
QUICK = dict(new="4,32", cached="0,64", repeats=1, prefill="64")
TOLERANCE = 1.10


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


class Timed:
    """An auto engine whose steps an observer times. `force` names the strategy of the next
    steps (None: auto's own choice): every strategy runs in the same ranks over the same cache."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.auto = self.engine.auto
        assert self.auto is not None, "the bench runs an engine with strategy='auto'"
        self.engine.auto = self  # the engine asks this object for each step's strategy
        self.force: str | None = None
        self.last: tuple[str, float] | None = None
        self.engine.observers.append(self._observe)

    def choose(self, scheduled: list[Any]) -> str:
        return self.force or self.auto.choose(scheduled)

    def _observe(self, msg: Any, result: Any, seconds: float) -> None:
        if any(not s.decode for s in msg.seqs):
            self.last = (msg.strategy, seconds)

    def prefill(self, prompt: list[int], force: str | None = None) -> tuple[str, float, int]:
        """Run one request to its first token; (strategy, seconds, cached tokens) of its last prefill step."""
        eng = self.engine
        self.force = force
        rid = eng.add_request(prompt, ONE)
        while not eng.requests[rid].detok.finished:
            eng.step()
        cached = eng.output(rid).num_cached_tokens
        eng.forget(rid)
        assert self.last is not None
        return (*self.last, cached)


def _config(args: argparse.Namespace, sp: int, strategy: str, budget: int, **over: Any) -> EngineConfig:
    return engine_config(
        args, sp_size=sp, strategy=strategy, max_num_batched_tokens=budget, long_prefill_token_threshold=budget, **over
    )


def grid(args: argparse.Namespace) -> dict[str, Any]:
    news, cacheds = _ints(args.new), _ints(args.cached)
    budget = max(news + cacheds) + 64
    t = Timed(_config(args, args.sp_size, "auto", budget))
    try:
        auto = t.auto
        mc, vocab = auto.mc, auto.mc.vocab_size
        times: dict[tuple[int, int], dict[str, list[float]]] = {}
        picks: dict[tuple[int, int], list[str]] = {}
        predicted: dict[tuple[int, int], dict[str, float]] = {}  # what auto predicted, blocks and all
        for c in cacheds:
            prefix = make_prompt(None, vocab, c, "random", seed=1000 + c)
            if c:
                t.prefill(prefix + make_prompt(None, vocab, 1, "random", seed=7))
            for n in news:
                point = times.setdefault((c, n), {s: [] for s in STRATEGIES})
                for rep in range(args.repeats):
                    for i, s in enumerate(STRATEGIES):  # in turn: a drift of the machine hits all alike
                        # a fresh suffix each time: only the prefix comes from the cache
                        seed = 1_000_000 * (rep + 1) + 100_000 * i + 10 * n + c
                        used, seconds, got = t.prefill(
                            prefix + make_prompt(None, vocab, n, "random", seed=seed), None if s == "auto" else s
                        )
                        if got != c:
                            raise RuntimeError(f"{s}: {got} tokens came from the prefix cache, expected {c}")
                        point[s].append(seconds)
                        if s == "auto":
                            picks.setdefault((c, n), []).append(used)
                            assert auto.last is not None
                            predicted.setdefault((c, n), auto.last.seconds)
        rows = []
        for (c, n), point in sorted(times.items()):
            med = {s: statistics.median(v) for s, v in point.items()}
            fastest = min(STRATEGIES[:-1], key=lambda s: med[s])
            pick = statistics.mode(picks[(c, n)])
            rows.append(
                {
                    "new": n,
                    "cached": c,
                    "measured_s": {s: med[s] for s in STRATEGIES},
                    "predicted_s": predicted[(c, n)],
                    "fastest": fastest,
                    "auto_pick": pick,
                    "auto_picks": picks[(c, n)],
                    "meta_rule": "ring" if pass_kv_for_meta(n, c, mc.num_heads, mc.num_kv_heads) else "pass_q",
                    "pick_is_fastest": pick == fastest,
                    # auto's own runs, and the runs of the strategy it picked, against the fastest
                    "auto_within_10pct": med["auto"] <= TOLERANCE * med[fastest],
                    "pick_within_10pct": med[pick] <= TOLERANCE * med[fastest],
                }
            )
    finally:
        t.engine.shutdown()
    share = sum(r["auto_within_10pct"] for r in rows) / len(rows)
    pick_share = sum(r["pick_within_10pct"] for r in rows) / len(rows)
    return {"sp": args.sp_size, "repeats": args.repeats, "rows": rows, "auto_share": share, "pick_share": pick_share}


def prefill(args: argparse.Namespace) -> dict[str, Any]:
    lengths = _ints(args.prefill)
    rows = []
    for sp in sorted({1, args.sp_size}):
        budget = max(lengths) + 64
        t = Timed(_config(args, sp, "auto", budget, enable_prefix_caching=False))
        try:
            auto = t.auto
            for n in lengths:
                prompt = make_prompt(None, auto.mc.vocab_size, n, "random", seed=n)
                used, seconds, _ = t.prefill(prompt)
                cost = auto.last
                assert cost is not None
                rows.append(
                    {
                        "sp": sp,
                        "tokens": n,
                        "strategy": used,
                        "measured_s": seconds,
                        "predicted_s": cost.seconds[used],
                        "ratio": cost.seconds[used] / seconds,
                    }
                )
        finally:
            t.engine.shutdown()
    return {"rows": rows, "within_15pct": sum(abs(r["ratio"] - 1) <= 0.15 for r in rows) / len(rows)}


def report(results: dict[str, Any]) -> str:
    out = []
    if "grid" in results:
        g = results["grid"]
        out.append(f"SP {g['sp']}, median of {g['repeats']} steps; times in ms (predicted in brackets)")
        out.append(
            f"| new | cached | {' | '.join(STRATEGIES)} | fastest | auto picks | Meta's rule | auto within 10% |"
        )
        out.append("|---:|---:|" + "---:|" * len(STRATEGIES) + "---|---|---|---|")
        for r in g["rows"]:
            m, p = r["measured_s"], r["predicted_s"]
            cells = [f"{m[s] * 1e3:.0f} ({p[s] * 1e3:.0f})" for s in STRATEGIES[:-1]]
            out.append(
                f"| {r['new']} | {r['cached']} | {' | '.join(cells)} | {m['auto'] * 1e3:.0f} | {r['fastest']} | "
                f"{r['auto_pick']} | {r['meta_rule']} | {'yes' if r['auto_within_10pct'] else 'no'} |"
            )
        out.append(
            f"auto within 10% of the fastest: {g['auto_share']:.0%} of points "
            f"(its pick's own runs: {g['pick_share']:.0%})"
        )
    if "prefill" in results:
        out.append("| SP | tokens | strategy | measured s | predicted s | predicted / measured |")
        out.append("|---:|---:|---|---:|---:|---:|")
        for r in results["prefill"]["rows"]:
            out.append(
                f"| {r['sp']} | {r['tokens']} | {r['strategy']} | {r['measured_s']:.2f} | {r['predicted_s']:.2f} "
                f"| {r['ratio']:.2f} |"
            )
        out.append(f"within 15%: {results['prefill']['within_15pct']:.0%} of rows")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqpar bench auto", description=__doc__.split("\n\n")[0])
    add_engine_args(
        p.add_argument_group(
            "engine (--num-threads 1 on a many-core machine runs SP > 2 at the per-thread rates "
            "`seqpar tune` measures; --rope-scaling for steps past the model's context)"
        ),
        defaults={"sp_size": 2, "kv_cache_gb": 2.0},
    )
    p.add_argument("--new", default="16,128,512,2048", help="new tokens per step, comma-separated")
    p.add_argument("--cached", default="0,512,2048,6000", help="cached tokens before them (block multiples)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill", default="2048,4096,8000", help="whole-prompt lengths for the prediction check")
    p.add_argument("--parts", default="grid,prefill", help="grid, prefill or both")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    results: dict[str, Any] = {"args": vars(args)}
    parts = {"grid": grid, "prefill": prefill}
    for name in args.parts.split(","):
        if name not in parts:
            p.error(f"unknown part {name!r}; choose among {', '.join(parts)}")
        results[name] = parts[name](args)
    print(report(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
