"""Decode ms per step with and without packed decode weights, both engines up, rounds alternating.

    python scripts/packed_decode_ab.py BATCH CONTEXT SP      # e.g. 1 1024 1, 16 1024 1

Default model, bf16, BATCH random-token prompts of CONTEXT tokens, cached first (prefix caching),
so a run's time is decode: (time of 65 tokens - time of 1) / 64, six rounds.
"""

import sys
import time

import torch

from seqpar import LLM, SamplingParams


def main() -> None:
    batch, ctx, sp = (int(a) for a in sys.argv[1:4])
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (ctx,), generator=gen).tolist() for _ in range(batch)]
    llms = {p: LLM(dtype="bfloat16", sp_size=sp, packed_decode_weights=p) for p in (False, True)}
    ms: dict[bool, list[float]] = {p: [] for p in llms}
    for _ in range(6):
        for p, llm in llms.items():
            llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))  # cache the prompts
            times = []
            for n in (1, 65):
                t0 = time.perf_counter()
                llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                times.append(time.perf_counter() - t0)
            ms[p].append((times[1] - times[0]) / 64 * 1e3)
    for p, v in ms.items():
        v.sort()
        print(f"sp{sp} batch {batch} context {ctx} packed={p}: ms/step median {v[len(v) // 2]:.1f}, all {v}")
    for llm in llms.values():
        llm.shutdown()


if __name__ == "__main__":
    main()
