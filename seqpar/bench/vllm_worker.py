"""The vLLM side of the vLLM baseline: run as a script by the Python of an environment holding vLLM.

    VLLM_PYTHON seqpar/bench/vllm_worker.py '{"model": DIR, "dtype": "bfloat16", ...}'

Standard library and vLLM only: it must not import seqpar, which that environment need not have.
It answers on its standard output, one JSON object a line; everything else it (or vLLM) prints
goes to its standard error. The first line says whether vLLM came up:
{"ok": true, "vllm": VERSION} or {"ok": false, "error": ...}. Then one request a line on its
standard input, one answer a line:

- {"op": "generate", "prompts": [[ids...], ...], "max_tokens": N}: greedy, ignore_eos, the prompts
  added to vLLM's engine together and stepped to the end. Answer: {"ok": true, "wall_s",
  "first_token_s" (from the requests' arrival to the first output, per prompt), "steps_s"
  (each engine step's time, as the gap between consecutive outputs), "step_tokens" (tokens each
  step produced), "tokens" (per prompt)};
- {"op": "generate_wall", ...}: the same through `LLM.generate` (its wall time only, tokens);
- {"op": "quit"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own prints (and its C++ extensions') go to stderr
    sys.stdout = sys.stderr

    def answer(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        opts = json.loads(sys.argv[1])
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        llm = LLM(
            model=opts["model"],
            dtype=opts.get("dtype", "bfloat16"),
            enable_prefix_caching=False,
            max_num_batched_tokens=opts.get("max_num_batched_tokens", 8192),
            max_model_len=opts.get("max_model_len"),
            max_num_seqs=opts.get("max_num_seqs", 256),
            seed=0,
            # On CPU this is the share of the node's memory that must be free at start-up, even with the
            # KV cache sized by VLLM_CPU_KVCACHE_SPACE; vLLM's 0.92 fails on a machine shared with others.
            gpu_memory_utilization=opts.get("gpu_memory_utilization", 0.3),
        )
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        answer({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return 1
    answer({"ok": True, "vllm": getattr(vllm, "__version__", "?"), "dtype": str(llm.llm_engine.model_config.dtype)})

    def params(n: int, delta: bool) -> SamplingParams:
        p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        if delta:
            p.output_kind = RequestOutputKind.DELTA
        return p

    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "quit":
            break
        try:
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in req["prompts"]]
            n = int(req["max_tokens"])
            if op == "generate_wall":
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params(n, False), use_tqdm=False)
                wall = time.perf_counter() - t0
                answer({"ok": True, "wall_s": wall, "tokens": [list(o.outputs[0].token_ids) for o in outs]})
                continue
            if op != "generate":
                raise ValueError(f"unknown op {op!r}")
            engine = llm.llm_engine
            # numeric ids from LLM's own counter: LLM.generate sorts its outputs by int(request_id)
            ids = [str(next(llm.request_counter)) for _ in prompts]
            t0 = time.perf_counter()
            for i, p in zip(ids, prompts):
                engine.add_request(i, p, params(n, True))
            tokens: dict[str, list[int]] = {i: [] for i in ids}
            first: dict[str, float] = {}
            steps: list[float] = []
            step_tokens: list[int] = []
            last = t0
            while engine.has_unfinished_requests():
                outs = engine.step()
                now = time.perf_counter()
                if not outs:
                    continue
                steps.append(now - last)
                step_tokens.append(0)
                last = now
                for o in outs:
                    new = list(o.outputs[0].token_ids)
                    if new and o.request_id not in first:
                        first[o.request_id] = now - t0
                    tokens[o.request_id].extend(new)
                    step_tokens[-1] += len(new)
            answer(
                {
                    "ok": True,
                    "wall_s": last - t0,
                    "first_token_s": [first.get(i) for i in ids],
                    "steps_s": steps,
                    "step_tokens": step_tokens,
                    "tokens": [tokens[i] for i in ids],
                }
            )
        except Exception as e:  # noqa: BLE001 - reported to the parent
            answer({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
