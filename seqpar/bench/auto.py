"""Does `strategy="auto"` pick a fast strategy? And does the cost model predict prefill time?

    seqpar bench auto [engine flags] [--new 16,128,512,2048] [--cached 0,512,2048,6000]
                      [--repeats 3] [--prefill 2048,4096,8000] [--parts grid,prefill] [--rope-scaling JSON]
                      [--num-threads T] [--json out.json]
    seqpar bench auto --quick          # tiny sizes, a smoke test

grid: one engine per strategy at `--sp` (ring, pass_q, allgather, and auto), all up side by
side and run in turn, so slow drifts of the machine hit every strategy alike. For each cached
length C a prefix of C tokens is prefilled once per engine; then each step prefills N new tokens
over it (a fresh suffix each repeat, so only the prefix comes from the cache). The step's time,
auto's pick and its predictions are the engine's own (the step record its observers get: the
ranks' compute and communication, no scheduling). Per point: the fastest strategy measured
(median over repeats), auto's pick and its measured time, and whether that is within 10% of the
fastest; Meta's pass-KV / pass-Q rule is shown beside it.

prefill: one whole prompt of T tokens in one step at SP 1 and at `--sp`, under auto; the step's
measured time against the cost model's prediction for the strategy auto chose.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from seqpar.bench.prompts import make_prompt
from seqpar.bench.report import add_json_arg, markdown_table, write_json
from seqpar.engine.args import add_engine_args, engine_config
from seqpar.engine.config import EngineConfig
from seqpar.engine.llm_engine import LLMEngine
from seqpar.engine.outputs import StepRecord
from seqpar.engine.sampling_params import SamplingParams
from seqpar.strategies.over_cache import pass_kv_for_meta
from seqpar.strategies.registry import over_cache_names

STRATEGIES = (*over_cache_names(), "auto")  # every engine strategy, then auto's pick
ONE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
# a cache for these sizes (~1,000 tokens per rank of the default model): four engines' ranks zeroing
# the 2 GiB default each, side by side, would take longer than the steps
QUICK = dict(new="4,32", cached="0,64", repeats=1, prefill="64", kv_cache_gb=0.05)
TOLERANCE = 1.10


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


class Timed:
    """An engine whose prefill steps its observer records: the strategy the step ran, the ranks'
    time, and under auto the cost model's prediction for every strategy."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.last: StepRecord | None = None
        self.engine.observers.append(self._observe)

    def _observe(self, record: StepRecord) -> None:
        if not record.decode_only:
            self.last = record

    def prefill(self, prompt: list[int]) -> tuple[StepRecord, int]:
        """Run one request alone to its first token; its last prefill step's record, and its cached tokens."""
        eng = self.engine
        rid = eng.add_request(prompt, ONE)
        while eng.has_unfinished():
            eng.step()
        cached = eng.output(rid).num_cached_tokens
        eng.forget(rid)
        assert self.last is not None
        return self.last, cached


def _config(args: argparse.Namespace, sp: int, strategy: str, budget: int, **over: Any) -> EngineConfig:
    return engine_config(
        args, sp_size=sp, strategy=strategy, max_num_batched_tokens=budget, long_prefill_token_threshold=budget, **over
    )


def grid(args: argparse.Namespace) -> dict[str, Any]:
    news, cacheds = _ints(args.new), _ints(args.cached)
    budget = max(news + cacheds) + 64
    engines: dict[str, Timed] = {}
    try:
        for s in STRATEGIES:  # each strategy its own engine, all up side by side, run in turn
            engines[s] = Timed(_config(args, args.sp_size, s, budget))
        mc = engines["auto"].engine.model_config
        vocab = mc.vocab_size
        times: dict[tuple[int, int], dict[str, list[float]]] = {}
        picks: dict[tuple[int, int], list[str]] = {}
        predicted: dict[tuple[int, int], dict[str, float]] = {}  # what auto predicted, blocks and all
        for c in cacheds:
            prefix = make_prompt(None, vocab, c, "random", seed=1000 + c)
            if c:
                for t in engines.values():  # every engine caches the same prefix
                    t.prefill(prefix + make_prompt(None, vocab, 1, "random", seed=7))
            for n in news:
                point = times.setdefault((c, n), {s: [] for s in STRATEGIES})
                for rep in range(args.repeats):
                    for i, s in enumerate(STRATEGIES):  # in turn: a drift of the machine hits all alike
                        # a fresh suffix each time: only the prefix comes from the cache
                        seed = 1_000_000 * (rep + 1) + 100_000 * i + 10 * n + c
                        step, got = engines[s].prefill(prefix + make_prompt(None, vocab, n, "random", seed=seed))
                        if got != c:
                            raise RuntimeError(f"{s}: {got} tokens came from the prefix cache, expected {c}")
                        point[s].append(step.seconds)
                        if s == "auto":
                            assert step.predicted_s is not None
                            picks.setdefault((c, n), []).append(step.strategy)
                            predicted.setdefault((c, n), step.predicted_s)
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
        for t in engines.values():
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
            for n in lengths:
                prompt = make_prompt(None, t.engine.model_config.vocab_size, n, "random", seed=n)
                step, _ = t.prefill(prompt)
                assert step.predicted_s is not None
                predicted = step.predicted_s[step.strategy]
                rows.append(
                    {
                        "sp": sp,
                        "tokens": n,
                        "strategy": step.strategy,
                        "measured_s": step.seconds,
                        "predicted_s": predicted,
                        "ratio": predicted / step.seconds,
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
        head = ["new", "cached", *STRATEGIES, "fastest", "auto picks", "Meta's rule", "auto within 10%"]
        rows = []
        for r in g["rows"]:
            m, p = r["measured_s"], r["predicted_s"]
            cells = [f"{m[s] * 1e3:.0f} ({p[s] * 1e3:.0f})" for s in STRATEGIES[:-1]]
            rows.append(
                [r["new"], r["cached"], *cells, f"{m['auto'] * 1e3:.0f}", r["fastest"], r["auto_pick"], r["meta_rule"]]
                + ["yes" if r["auto_within_10pct"] else "no"]
            )
        out.append(markdown_table(head, rows, numeric=range(2 + len(STRATEGIES))))
        out.append(
            f"auto within 10% of the fastest: {g['auto_share']:.0%} of points "
            f"(its pick's own runs: {g['pick_share']:.0%})"
        )
    if "prefill" in results:
        head = ["SP", "tokens", "strategy", "measured s", "predicted s", "predicted / measured"]
        rows = [
            [
                r["sp"],
                r["tokens"],
                r["strategy"],
                f"{r['measured_s']:.2f}",
                f"{r['predicted_s']:.2f}",
                f"{r['ratio']:.2f}",
            ]
            for r in results["prefill"]["rows"]
        ]
        out.append(markdown_table(head, rows, numeric=(0, 1, 3, 4, 5)))
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
    p.add_argument("--quick", action="store_true", help="tiny sizes and a 0.05 GiB cache (a smoke test)")
    add_json_arg(p)
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
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
