"""Decode benchmark: seqpar against transformers, ms/token at several contexts and a batch of 16.

    seqpar bench decode [engine flags] [--contexts 1024,4096,8000] [--tokens 32]
                        [--batch 16] [--batch-context 1024] [--repeats 3] [--json out.json]

Configurations, fp32, greedy, defaults otherwise (as a new user would run them):
- `sp1`: LLM(model, sp_size=1) (2 threads on this machine);
- `sp2`: LLM(model, sp_size=2) (2 ranks x 1 thread; decode steps split the MLP);
- `hf`: transformers' CausalLM with the same weights, `torch.set_num_threads(2)`, KV cache,
  one token per forward, in its own process;
- `vllm` (only with `--vllm-python`): vLLM's CPU build on every core, in its own Python
  environment (seqpar.bench.vllm_baseline); ms/token from its engine steps after the first
  token; its tokens are compared for information only, not for the exit status.
ms/token = decode time of `--tokens` tokens after the first / their number. Batch: `--batch`
prompts of `--batch-context` tokens decoded together; throughput = batch x (tokens - 1) /
(time with `--tokens` - time with 1), for seqpar's `generate` and transformers' `generate`.
Rounds rotate the order of configurations; figures are medians; ratios are to `hf` in the
same run. Greedy tokens of every configuration must agree (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from seqpar.bench import vllm_baseline
from seqpar.bench.prompts import make_prompt
from seqpar.bench.report import add_json_arg, markdown_table, write_json
from seqpar.engine.args import ENGINE_FIELDS, add_engine_args, engine_config
from seqpar.model import hf_model_from

QUICK = dict(contexts="64,160", tokens=4, batch=2, batch_context=32, repeats=1)


def _hf_worker(model: str, conn: Any) -> None:
    torch.set_num_threads(2)
    hf = hf_model_from(model)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        kind, prompts, n = job
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.inference_mode():
            if kind == "decode":
                out = hf(ids, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                tokens, t0 = [int(tok)], time.perf_counter()
                for _ in range(n - 1):
                    out = hf(tok, past_key_values=past, use_cache=True)
                    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(int(tok))
                conn.send(((time.perf_counter() - t0) / (n - 1), tokens))
            else:
                times = []
                for m in (1, n):
                    t0 = time.perf_counter()
                    hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=m,
                        min_new_tokens=m,
                        do_sample=False,
                        pad_token_id=0,
                    )
                    times.append(time.perf_counter() - t0)
                conn.send((ids.shape[0] * (n - 1) / (times[1] - times[0]), None))


class HF:
    def __init__(self, model: str) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hf_worker, args=(model, child), daemon=True)
        self.proc.start()
        self.conn.recv()

    def __call__(self, kind: str, prompts: list[list[int]], n: int) -> Any:
        self.conn.send((kind, prompts, n))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)


def _seqpar_decode(llm: Any, prompt: list[int], n: int) -> tuple[float, list[int]]:
    from seqpar import SamplingParams

    out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
    return 1.0 / out.metrics["decode_tokens_per_s"], list(out.outputs[0].token_ids)


def _seqpar_batch(llm: Any, prompts: list[list[int]], n: int) -> float:
    from seqpar import SamplingParams

    times = []
    for m in (1, n):
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
        times.append(time.perf_counter() - t0)
    return len(prompts) * (n - 1) / (times[1] - times[0])


def main(argv: list[str] | None = None) -> int:
    from seqpar import LLM
    from seqpar.model import load_tokenizer

    p = argparse.ArgumentParser(prog="seqpar bench decode", description=__doc__.split("\n\n")[0])
    add_engine_args(
        p.add_argument_group("engine (SP 1 and SP 2 both run)"),
        defaults={"enable_prefix_caching": False},
        only=[f for f in ENGINE_FIELDS if f != "sp_size"],
    )
    p.add_argument("--contexts", default="1024,4096,8000")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch-context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    add_json_arg(p)
    vllm_baseline.add_arguments(p)
    args = p.parse_args(argv)
    vllm_baseline.check_arguments(p, args)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    contexts = [int(c) for c in str(args.contexts).split(",")]
    tok = load_tokenizer(args.model)
    vocab = len(tok)
    prompts = {c: make_prompt(tok, vocab, c, "text", seed=c) for c in contexts}
    batch = [make_prompt(tok, vocab, args.batch_context, "random", seed=100 + i) for i in range(args.batch)]
    try:  # first: a vLLM that cannot start fails the run before anything else is built
        vllm = vllm_baseline.start(args, log=lambda m: print(m, file=sys.stderr))
    except vllm_baseline.VLLMUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runners: dict[str, Any] = {"hf": HF(args.model)}
    for sp in (1, 2):
        runners[f"sp{sp}"] = LLM(engine_config(args, sp_size=sp))
    if vllm is not None:
        runners["vllm"] = vllm
    ms: dict[str, dict[int, list[float]]] = {k: {c: [] for c in contexts} for k in runners}
    tps: dict[str, list[float]] = {k: [] for k in runners}
    tokens: dict[str, dict[int, list[int]]] = {k: {} for k in runners}
    try:
        for r in range(args.repeats):
            order = list(runners)[r % len(runners) :] + list(runners)[: r % len(runners)]
            for c in contexts:
                for key in order:
                    run = runners[key]
                    if key == "hf":
                        t, toks = run("decode", [prompts[c]], args.tokens)
                    elif key == "vllm":
                        t, toks = run.decode(prompts[c], args.tokens)
                    else:
                        t, toks = _seqpar_decode(run, prompts[c], args.tokens)
                    ms[key][c].append(1000 * t)
                    tokens[key][c] = toks
            for key in order:
                run = runners[key]
                if key == "hf":
                    tps[key].append(run("batch", batch, args.tokens)[0])
                elif key == "vllm":
                    tps[key].append(run.batch(batch, args.tokens))
                else:
                    tps[key].append(_seqpar_batch(run, batch, args.tokens))
    finally:
        runners.pop("hf").close()
        for llm in runners.values():  # seqpar's LLMs and the vLLM baseline
            llm.shutdown()
    summary: dict[str, Any] = {"ms_per_token": {}, "ratio_to_hf": {}, "batch_tokens_per_s": {}}
    for key in ms:
        summary["ms_per_token"][key] = {c: statistics.median(v) for c, v in ms[key].items()}
        summary["batch_tokens_per_s"][key] = statistics.median(tps[key])
    for key in [k for k in ms if k != "hf"]:
        summary["ratio_to_hf"][key] = {
            c: summary["ms_per_token"][key][c] / summary["ms_per_token"]["hf"][c] for c in contexts
        }
    exact = {c: tokens["sp1"][c] == tokens["sp2"][c] == tokens["hf"][c] for c in contexts}
    summary["exact"] = exact
    vl = vllm is not None
    if vl:  # information only: vLLM may run another dtype
        summary["vllm"] = {
            "label": vllm.label,
            "tokens_equal_sp1": {c: tokens["vllm"][c] == tokens["sp1"][c] for c in contexts},
        }
    m = summary["ms_per_token"]
    others = ["sp1", "sp2", *(["vllm"] if vl else [])]
    head = ["context", "transformers ms/token", "seqpar SP 1", "seqpar SP 2", *([vllm.label] if vl else [])]
    rows = [
        [f"{c:,}", f"{m['hf'][c]:.1f}", *(f"{m[k][c]:.1f} ({m[k][c] / m['hf'][c]:.2f}x)" for k in others)]
        for c in contexts
    ]
    lines = [markdown_table(head, rows, numeric=range(1, len(head)))]
    b = summary["batch_tokens_per_s"]
    lines.append(
        f"\nBatch of {args.batch} x {args.batch_context} tokens, decode tokens/s: transformers "
        f"{b['hf']:.1f}, seqpar SP 1 {b['sp1']:.1f} ({b['sp1'] / b['hf']:.2f}x), "
        f"SP 2 {b['sp2']:.1f} ({b['sp2'] / b['hf']:.2f}x)"
        + (f", {vllm.label} {b['vllm']:.1f} ({b['vllm'] / b['hf']:.2f}x)" if vl else "")
    )
    lines.append(f"greedy tokens equal (SP 1, SP 2, transformers): {exact}")
    if vl:
        lines.append(f"vLLM's greedy tokens equal SP 1's (information): {summary['vllm']['tokens_equal_sp1']}")
    print("\n".join(lines))
    write_json(args.json, {"args": vars(args), "summary": summary, "ms": ms, "batch": tps})
    return 0 if all(exact.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
