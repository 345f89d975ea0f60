"""Deterministic inference off against on, both engines up in one process, rounds alternating.

    python scripts/deterministic_cost.py SP ROUNDS LENGTHS     # e.g. 1 4 4096,8192

Default model, `dtype` auto, `strategy="ring"`, prefix caching off, one step per prompt
(`max_num_batched_tokens` 8,192): TTFT of each prompt length (the first tokens of the text
prompt of `seqpar bench engine`), then decode ms/token over 32 greedy tokens after a 1,024-token
prompt. Prints each round, the medians and on / off.
"""

import json
import statistics
import sys

from seqpar import LLM, SamplingParams
from seqpar.bench.prompts import make_prompt
from seqpar.model import load_tokenizer
from seqpar.model.loader import DEFAULT_MODEL


def main() -> None:
    sp, rounds, lengths = int(sys.argv[1]), int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
    tok = load_tokenizer(DEFAULT_MODEL)
    base = make_prompt(tok, len(tok), 8192, "text", seed=0)
    llms = {
        mode: LLM(
            DEFAULT_MODEL,
            sp_size=sp,
            strategy="ring",
            enable_prefix_caching=False,
            max_num_batched_tokens=8192,
            kv_cache_gb=0.5,
            enable_deterministic_inference=mode == "on",
        )
        for mode in ("off", "on")
    }
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for llm in llms.values():  # warm-up
        llm.generate([base[:300]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    got: dict[str, dict[str, list[float]]] = {mode: {} for mode in llms}
    for r in range(rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            for n in lengths:
                out = llms[mode].generate([base[: n - 1]], one)[0]  # n - 1: 8,192 is the model's whole context
                got[mode].setdefault(f"ttft_{n}_s", []).append(out.metrics["time_to_first_token_s"])
            out = llms[mode].generate([base[:1024]], many)[0]
            got[mode].setdefault("decode_1k_ms", []).append(1000 / out.metrics["decode_tokens_per_s"])
        print(f"round {r}:", {m: {k: round(v[-1], 3) for k, v in got[m].items()} for m in got}, flush=True)
    med = {m: {k: statistics.median(v) for k, v in got[m].items()} for m in got}
    print(f"SP {sp} medians:", json.dumps(med))
    print("on / off:", {k: round(med["on"][k] / med["off"][k], 3) for k in med["on"]})
    for llm in llms.values():
        llm.shutdown()


if __name__ == "__main__":
    main()
