"""`seqpar demo` (`make demo`): a needle in a ~4K-token haystack, answered with the prompt
sharded over SP ranks.

SmolLM2-135M-Instruct reads seqpar/data/harrowmere.txt (fictional prose) with one
sentence, the needle, inserted half-way, and answers the one question only the needle
answers. Then the same prompt runs on a single rank: sequence parallelism changes where
attention is computed, not what, so the greedy tokens must match and their log-probs
differ only by fp32 rounding. The demo checks both and prints what it found.
"""

from __future__ import annotations

import argparse
from importlib import resources
from typing import Any

from seqpar.cli.generate import PrefillBar, summary
from seqpar.engine.llm import LLM
from seqpar.engine.sampling_params import SamplingParams
from seqpar.model.loader import DEFAULT_MODEL

CODE = "BLUE-7"
NEEDLE = f"The secret code for the lighthouse vault is {CODE}."
# A 135M model needs the question direct; asking it before and after the document
# found the needle at every depth and code tried (asked only after, it missed some).
QUESTION = "What is the secret code for the lighthouse vault? Answer with the code only."
MAX_TOKENS = 32


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="find a needle in a ~4K-token document at SP 2",
        description=(
            "SmolLM2-135M-Instruct answers a question whose answer is hidden mid-way through a ~4K-token document, "
            "with the prompt sharded over --sp ranks; prints the answer and the figures."
        ),
    )
    demo.add_argument("--sp", type=int, default=2, metavar="N", help="sequence-parallel ranks (default: 2)")


def document() -> tuple[str, int, int]:
    """(the haystack with the needle inserted half-way, needle paragraph index, paragraphs)."""
    text = resources.files("seqpar.data").joinpath("harrowmere.txt").read_text(encoding="utf-8")
    paragraphs = text.strip().split("\n\n")
    middle = len(paragraphs) // 2
    paragraphs.insert(middle, NEEDLE)
    return "\n\n".join(paragraphs), middle, len(paragraphs)


def conversation(doc: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{QUESTION}\n\n{doc}\n\n{QUESTION}"}]


def answer(llm: LLM, prompt: list[int]) -> Any:
    """Greedy answer with the log-prob of each chosen token; a prefill bar meanwhile."""
    # The answer is one line; a 135M model rambles on after it, so stop at the newline.
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=["\n"], logprobs=0)
    with PrefillBar() as bar:
        for _ in llm.stream(prompt, params, on_progress=bar):
            bar.close()
    return llm.last_output


def main(sp_size: int = 2, model: str = DEFAULT_MODEL) -> int:
    doc, where, paragraphs = document()
    print(f"seqpar demo: a needle in a haystack, {model}, {sp_size} SP rank(s), greedy decoding")
    # float32: the demo shows exactness to fp32 rounding (auto may pick bf16, whose rounding
    # lets SP N's tokens part from 1 rank's after a few; tests/test_bf16.py checks those)
    with LLM(model, sp_size=sp_size, dtype="float32") as llm:
        prompt = llm.chat_prompt(conversation(doc))
        doc_tokens = len(llm.get_tokenizer().encode(doc, add_special_tokens=False))
        print(
            f"document: seqpar/data/harrowmere.txt, {doc_tokens} tokens with the needle at paragraph "
            f"{where + 1} of {paragraphs}: {NEEDLE!r}"
        )
        print(f"question: {QUESTION!r} (asked before and after the document; {len(prompt)} prompt tokens)\n")
        out = answer(llm, prompt)
    text = out.outputs[0].text.strip()
    found = CODE.lower() in text.lower()
    print(f"answer: {text}")
    print(f"needle found: {'yes' if found else 'NO'} ({CODE!r} {'is' if found else 'is not'} in the answer)\n")
    print(summary(out))
    exact = True
    if sp_size > 1:
        print("\nchecking exactness: the same prompt on 1 rank ...", flush=True)
        with LLM(model, sp_size=1, dtype="float32") as llm:
            ref = answer(llm, prompt)
        exact, report = exactness(out, ref, sp_size)
        print(report)
    return 0 if found and exact else 1


# fp32 logits of the same math summed in another order differ by ~1e-5 over 4K tokens
# and 30 layers; an approximate attention (or a bug) moves log-probs by far more.
LOGPROB_TOLERANCE = 1e-3


def exactness(out: Any, ref: Any, sp_size: int) -> tuple[bool, str]:
    """Compare the SP run with the 1-rank run: tokens, log-probs of the chosen tokens, KV bytes per rank."""
    got, want = out.outputs[0], ref.outputs[0]
    kv_sp, kv_one = out.metrics["kv_cache_bytes_per_rank"], ref.metrics["kv_cache_bytes_per_rank"]
    kv = (
        f"KV cache per rank: {', '.join(f'{b / 2**20:.1f}' for b in kv_sp)} MiB at SP {sp_size}, "
        f"{kv_one[0] / 2**20:.1f} MiB on 1 rank"
    )
    if got.token_ids != want.token_ids:
        n = next(
            (i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b),
            min(len(got.token_ids), len(want.token_ids)),
        )
        return False, f"NOT exact: the tokens differ from token {n} on (1 rank answered {want.text.strip()!r})\n{kv}"
    diff = max(abs(a[t].logprob - b[t].logprob) for t, a, b in zip(got.token_ids, got.logprobs, want.logprobs))
    if diff > LOGPROB_TOLERANCE:
        return False, f"NOT exact: same tokens, but log-probs differ by up to {diff:.1e}\n{kv}"
    return True, (
        f"exact: SP {sp_size} gave the same {len(got.token_ids)} tokens as 1 rank, their log-probs within "
        f"{diff:.1e} (fp32 rounding; sequence-parallel attention is exact, not an approximation)\n{kv}"
    )
