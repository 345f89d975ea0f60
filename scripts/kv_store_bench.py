"""The KV store (`kv_store_dir`): a document prefilled once, against prefilling it again.

    python scripts/kv_store_bench.py SP [ROUNDS] [PARTS]  # e.g. 1 2, then 2 2; PARTS: decode,restart,serve,evicted_host

Default model, `dtype` auto, default engine options otherwise, through `seqpar.LLM` (a restart is a
new `LLM` over the same folder: new rank processes, an empty paged cache, the store kept), or for
`serve` through `seqpar serve` itself. Every engine first runs one unrelated 1,100-token prompt
(compiled tiles warm), so TTFTs are the document's alone. Per round:
0. serve: `python -m seqpar serve --sp SP --dtype float32 --kv-store-dir D` on a free port, the same
   document and question through the `openai` client (streamed: TTFT is the first chunk's arrival),
   the server stopped (SIGTERM) and started again over D, the same request: TTFT against the cold
   one, and the 16 answer tokens and their log-probs compared (fp32, so any difference shows);
   `serve_det`: the same with `--enable-deterministic-inference`.
1. restart: a 7,900-token document (seqpar/data/harrowmere.txt's tokens repeated) and a question,
   cold (an empty store), then in a new engine over the same folder; the greedy tokens must be equal.
2. evicted: a paged cache of ~1.1 documents of 4,000 tokens (`kv_cache_gb` from the model's block
   bytes), questions alternating A, B, A, B, A, B: each return's TTFT over its document's cold TTFT.
   `evicted_host`: the same with host memory as the only tier (`kv_store_host_gb=4`, no folder).
3. decode: ms/token of 4 requests decoding 64 tokens after distinct 1,024-token prompts, store on vs
   off, both engines up at once, after one such load not kept, rounds alternating; with the store on,
   the prompts' blocks (and the decode's filled blocks) are written in the background while it runs.
Prints each round, the medians and the ratios against the issue's targets.
"""

import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources

import openai

from seqpar import LLM, SamplingParams
from seqpar.bench.prompts import make_prompt
from seqpar.engine.config import EngineConfig
from seqpar.engine.dtype import resolve_dtype
from seqpar.engine.kv_cache import block_bytes
from seqpar.model import load_config, load_tokenizer
from seqpar.model.loader import DEFAULT_MODEL

ANSWER = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
FIRST = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
DECODE = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def engine(sp: int, **kw) -> LLM:
    llm = LLM(DEFAULT_MODEL, sp_size=sp, **kw)
    llm.generate([WARM], FIRST)
    return llm


def ttft(llm: LLM, prompt: list[int]):
    out = llm.generate([prompt], ANSWER)[0]
    return out.metrics["time_to_first_token_s"], out


def restart(sp: int) -> dict:
    doc = (BOOK * 3)[:7900]
    prompt = doc + QUESTIONS[0]
    with tempfile.TemporaryDirectory() as d:
        with engine(sp, kv_store_dir=d) as llm:
            cold, a = ttft(llm, prompt)
        with engine(sp, kv_store_dir=d) as llm:
            warm, b = ttft(llm, prompt)
    same = a.outputs[0].token_ids == b.outputs[0].token_ids
    return {"cold_s": cold, "restart_s": warm, "restart_stored": b.num_stored_tokens, "same_tokens": same}


def _serve(sp: int, store: str, *extra: str) -> tuple[subprocess.Popen, openai.OpenAI]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--port", str(port), "--sp", str(sp), "--dtype", "float32", "--kv-store-dir", store, *extra]
    proc = subprocess.Popen([sys.executable, "-m", "seqpar", "serve", *args], stdout=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300, max_retries=0)
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("seqpar serve did not start") from None
            time.sleep(0.5)
    return proc, client


def _ask(client: openai.OpenAI, prompt: list[int]) -> tuple[float, list, list, int]:
    """(TTFT s, answer tokens, their log-probs, prompt tokens the store gave) of a streamed request."""
    model = client.models.list().data[0].id  # before the clock starts: not part of the TTFT
    t0, first, tokens, lps, stored = time.perf_counter(), None, [], [], 0
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=ANSWER.max_tokens,
        temperature=0,
        logprobs=1,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter() - t0
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            stored = getattr(chunk.usage.prompt_tokens_details, "stored_tokens", 0) or 0
    return first, tokens, lps, stored


def serve_restart(sp: int, *extra: str) -> dict:
    prompt = (BOOK * 3)[:7900] + QUESTIONS[0]
    got = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(2):  # cold, then after a restart over the same folder
            proc, client = _serve(sp, d, *extra)
            try:
                _ask(client, WARM)
                got.append(_ask(client, prompt))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    (cold, a, la, _), (warm, b, lb, stored) = got
    diff = max((abs(x - y) for x, y in zip(la, lb)), default=float("inf"))
    return {"cold_s": cold, "restart_s": warm, "restart_stored": stored, "same_tokens": a == b, "max_lp_diff": diff}


def evicted(sp: int, host: bool = False) -> dict:
    docs = {"A": BOOK[:4000], "B": (BOOK[2000:] + BOOK)[:4000]}
    config, _ = resolve_dtype(EngineConfig(model=DEFAULT_MODEL, sp_size=sp))
    mc = load_config(DEFAULT_MODEL)
    per_token = block_bytes(mc.num_layers, mc.num_kv_heads, mc.head_dim, config.torch_dtype, 1)
    gb = 1.1 * 4100 * per_token / sp / 2**30  # per rank: 1.1 documents, so a return finds most of its own evicted
    got: dict = {"cold_s": {}, "return_ratio": [], "return_stored": []}
    with tempfile.TemporaryDirectory() as d:
        store = {"kv_store_host_gb": 4.0} if host else {"kv_store_dir": d}
        with engine(sp, kv_cache_gb=gb, **store) as llm:
            for i in range(6):
                name = "AB"[i % 2]
                t, out = ttft(llm, docs[name] + QUESTIONS[i // 2])
                if name not in got["cold_s"]:
                    got["cold_s"][name] = t
                else:
                    got["return_ratio"].append(t / got["cold_s"][name])
                    got["return_stored"].append(out.num_stored_tokens)
                    got.setdefault("return_host", []).append(out.num_host_tokens)
    return got


def decode(llms: dict, r: int) -> dict:
    got = {}
    for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
        prompts = [make_prompt(TOK, len(TOK), 1024, "text", seed=1000 * r + 10 * j + (mode == "on")) for j in range(4)]
        outs = llms[mode].generate(prompts, DECODE)
        got[mode] = statistics.median(1000 / o.metrics["decode_tokens_per_s"] for o in outs)
    return got


def main() -> None:
    global TOK, BOOK, WARM, QUESTIONS
    sp, rounds = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2
    parts = sys.argv[3].split(",") if len(sys.argv) > 3 else ["decode", "restart"]  # restart: and evicted
    TOK = load_tokenizer(DEFAULT_MODEL)
    BOOK = TOK.encode(resources.files("seqpar.data").joinpath("harrowmere.txt").read_text(), add_special_tokens=False)
    WARM = make_prompt(TOK, len(TOK), 1100, "text", seed=99)
    asks = ("Who keeps the ledger?", "What happened at the mill?", "Where does the road end?")
    QUESTIONS = [TOK.encode(f"\n\nQuestion: {q}\nAnswer:", add_special_tokens=False) for q in asks]
    print(f"SP {sp}: the book is {len(BOOK)} tokens", flush=True)
    rows: dict[str, list] = {"restart": [], "evicted": [], "evicted_host": [], "decode": [], "serve": []}
    with tempfile.TemporaryDirectory() as d:
        llms = {"off": engine(sp), "on": engine(sp, kv_store_dir=d)} if "decode" in parts else {}
        rounds_decode = rounds if llms else 0
        if llms:
            decode(llms, 99)  # not kept: each engine's first batch of 4 decodes is several times slower
        for r in range(rounds_decode):
            rows["decode"].append(decode(llms, r))
            print(f"round {r} decode ms/token:", rows["decode"][-1], flush=True)
        for llm in llms.values():
            llm.shutdown()
    for r in range(rounds if "serve" in parts or "serve_det" in parts else 0):
        rows["serve"].append(serve_restart(sp, *(["--enable-deterministic-inference"] if "serve_det" in parts else [])))
        print(f"round {r} serve restart:", rows["serve"][-1], flush=True)
    for r in range(rounds if "restart" in parts else 0):
        rows["restart"].append(restart(sp))
        print(f"round {r} restart:", rows["restart"][-1], flush=True)
        rows["evicted"].append(evicted(sp))
        print(f"round {r} evicted:", rows["evicted"][-1], flush=True)
    for r in range(rounds if "evicted_host" in parts else 0):
        rows["evicted_host"].append(evicted(sp, host=True))
        print(f"round {r} evicted, host memory tier:", rows["evicted_host"][-1], flush=True)
    summary = {"sp": sp}
    if rows["decode"]:
        off = statistics.median(x["off"] for x in rows["decode"])
        on = statistics.median(x["on"] for x in rows["decode"])
        summary |= {"decode_ms_off": round(off, 2), "decode_ms_on": round(on, 2), "decode_on_over_off": on / off}
    if rows["serve"]:
        cold = statistics.median(x["cold_s"] for x in rows["serve"])
        warm = statistics.median(x["restart_s"] for x in rows["serve"])
        summary |= {
            "serve_cold_ttft_s": round(cold, 3),
            "serve_restart_ttft_s": round(warm, 3),
            "serve_restart_over_cold": warm / cold,
            "serve_same_tokens": all(x["same_tokens"] for x in rows["serve"]),
            "serve_max_logprob_diff": max(x["max_lp_diff"] for x in rows["serve"]),
        }
    if rows["restart"]:
        cold = statistics.median(x["cold_s"] for x in rows["restart"])
        warm = statistics.median(x["restart_s"] for x in rows["restart"])
        ret = [q for x in rows["evicted"] for q in x["return_ratio"]]
        summary |= {
            "cold_ttft_s": round(cold, 3),
            "restart_ttft_s": round(warm, 3),
            "restart_over_cold": warm / cold,
            "same_tokens": all(x["same_tokens"] for x in rows["restart"]),
            "evicted_cold_ttft_s": statistics.median(t for x in rows["evicted"] for t in x["cold_s"].values()),
            "evicted_return_over_cold_median": statistics.median(ret),
            "evicted_return_over_cold_max": max(ret),
            "evicted_return_stored_tokens": statistics.median(n for x in rows["evicted"] for n in x["return_stored"]),
        }
    if rows["evicted_host"]:
        hosted = rows["evicted_host"]
        ret = [q for x in hosted for q in x["return_ratio"]]
        summary |= {
            "host_evicted_cold_ttft_s": statistics.median(t for x in hosted for t in x["cold_s"].values()),
            "host_evicted_return_over_cold_median": statistics.median(ret),
            "host_evicted_return_over_cold_max": max(ret),
            "host_evicted_return_host_tokens": statistics.median(n for x in hosted for n in x["return_host"]),
        }
    shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in summary.items()}
    print(f"SP {sp} medians:", json.dumps(shown))
    targets = [
        ("serve restart <= 0.1x cold", "serve_restart_over_cold", 0.1),
        ("restart <= 0.1x cold", "restart_over_cold", 0.1),
        ("evicted return <= 0.15x cold", "evicted_return_over_cold_max", 0.15),
        ("evicted return from host memory <= 0.15x cold", "host_evicted_return_over_cold_max", 0.15),
        ("decode <= 1.05x", "decode_on_over_off", 1.05),
    ]
    print("targets:", " | ".join(f"{what}: {summary[key] <= bound}" for what, key, bound in targets if key in summary))


if __name__ == "__main__":
    main()
