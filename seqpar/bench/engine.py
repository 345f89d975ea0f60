"""Engine benchmark: the whole engine, end to end, at SP 1 and SP 2 against HF transformers.

    seqpar bench engine [--model smollm2-135m] [--prompt-tokens 8192] [--decode-contexts 1024,8192]
                        [--decode-tokens 32] [--repeats 3] [--json out.json]
    python -m seqpar.bench.engine --quick            # tiny sizes, a smoke test

Every configuration gets the same deterministic prompt (token ids from the model's
tokenizer on generated text, or with `--prompt random` a fixed pseudo-random id
sequence) and runs greedy (temperature 0). Configurations (fp32):

- `sp1-1t`: LLM(model, sp_size=1, num_threads=1);
- `sp2`: LLM(model, sp_size=2, num_threads=1) = 2 ranks x 1 thread, ring prefill over
  zigzag shards, decode merge allgather; `sp2-alltoall`, `sp2-tree`: the same with the
  other decode merges (decode only);
- `sp1-2t`: LLM(model, sp_size=1, num_threads=2), the fair single-process baseline;
- `hf-2t`: transformers' LlamaForCausalLM (sdpa attention) built from the same weights,
  `torch.set_num_threads(2)`, one forward over the prompt (use_cache=True, logits of the
  last token only: the prefill of `generate`), in its own process.

Engines are built (and warmed up on a short prompt) before anything is timed, and stay
up for the whole run, so start-up is excluded and every measurement round visits every
configuration, in an order that rotates each round: drift of a noisy machine hits all
alike. Figures are medians over `--repeats` rounds.

Measured:
1. time to first token of the prompt: `generate(prompt, SamplingParams(max_tokens=1,
   temperature=0))`, as the engine's `metrics["time_to_first_token_s"]` and as the wall
   time of the call (which adds the final cache-free round trip);
2. decode ms/token at each `--decode-contexts` context: `--decode-tokens` tokens with
   ignore_eos, from `metrics["decode_tokens_per_s"]`;
3. KV-cache bytes per rank after prefill (`metrics["kv_cache_bytes_per_rank"]`) and bytes
   each SP rank sent per prefill and per decoded token (`StepResult.comm_bytes` of every
   step, recorded as the driver receives it);
4. exactness: SP 2 greedy tokens must equal SP 1's (and the first token every
   configuration's, transformers' included). A mismatch makes the exit status 1.

The model's context bounds the prompt: a prompt must leave room for one generated token,
so `--prompt-tokens` is capped at context - 1 and a decode context at context -
`--decode-tokens` (the table shows the prompt lengths actually run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

QUICK = dict(prompt_tokens=192, decode_contexts="64,160", decode_tokens=4, repeats=1, shard_blocks=2)
DECODE_MERGES = ("allgather", "alltoall", "tree")

# Targets from the issue.
TARGET_TTFT_VS_SP1 = 0.55
TARGET_TTFT_VS_HF = 0.90
TARGET_KV_RATIO = 0.52


# ---------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Config:
    key: str
    label: str
    sp: int
    threads: int
    decode_merge: str = "allgather"
    ttft: bool = True  # timed for time to first token
    decode: bool = True  # timed for decode

    @property
    def shape(self) -> str:
        return f"{self.sp} x {self.threads}"


def build_configs(merges: list[str]) -> list[Config]:
    configs = [
        Config("sp1-1t", "seqpar SP 1, 1 thread", 1, 1, decode=False),
        Config("sp2", "seqpar SP 2 (ring, zigzag), 1 thread/rank", 2, 1, merges[0] if merges else "allgather",
               decode=bool(merges)),
        Config("sp1-2t", "seqpar SP 1, 2 threads", 1, 2),
    ]
    for m in merges[1:]:
        configs.append(Config(f"sp2-{m}", f"seqpar SP 2, decode merge {m}", 2, 1, m, ttft=False))
    return configs


def decode_label(c: Config) -> str:
    return f"seqpar SP 2, decode merge {c.decode_merge}" if c.sp == 2 else c.label


# ---------------------------------------------------------------- prompt

_NOUNS = ("lighthouse", "orchard", "bridge", "library", "harbour", "mill", "observatory", "market", "canal", "garden")
_ADJS = ("old", "northern", "quiet", "famous", "restored", "wooden", "busy", "small", "stone", "hidden")
_CITIES = ("Lisbon", "Oslo", "Turin", "Ghent", "Krakow", "Porto", "Lyon", "Bergen", "Utrecht", "Graz", "Seville", "Tartu")


def prompt_text(num_facts: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    facts = []
    for i in range(num_facts):
        facts.append(f"Record {i}: the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} of {rng.choice(_CITIES)} was built in "
                     f"{rng.randint(1200, 1990)} and welcomes {rng.randint(10, 9000)} visitors a week.")
    return " ".join(facts)


def make_prompt(tokenizer: Any, vocab_size: int, num_tokens: int, source: str, seed: int = 0) -> list[int]:
    """`num_tokens` deterministic token ids, the same for every configuration."""
    if source == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (num_tokens,), generator=gen).tolist()
    facts = max(8, num_tokens // 20)
    while True:
        ids = tokenizer.encode(prompt_text(facts, seed), add_special_tokens=False)
        if len(ids) >= num_tokens:
            return [int(t) for t in ids[:num_tokens]]
        facts *= 2


# ---------------------------------------------------------------- seqpar engines

@dataclass
class Call:
    kind: str  # prefill (the step carries prompt tokens) | decode
    wall_s: float
    comm_bytes: list[int]


class Engine:
    """One LLM kept up for the whole run; every step is recorded through the engine's observer hook."""

    def __init__(self, config: Config, model: str, kv_cache_gb: float, rope_scaling: dict | None = None,
                 shard_blocks: int = 16):
        from seqpar.engine.llm import LLM

        self.config = config
        # No prefix caching: every round must prefill the same prompt from scratch.
        self.llm = LLM(model, sp_size=config.sp, strategy="ring", scheme="zigzag", decode_merge=config.decode_merge,
                       num_threads=config.threads, kv_cache_gb=kv_cache_gb, enable_prefix_caching=False,
                       rope_scaling=rope_scaling, shard_blocks=shard_blocks)
        self.calls: list[Call] = []

        def record(msg: Any, result: Any, seconds: float) -> None:
            kind = "decode" if all(s.decode for s in msg.seqs) else "prefill"
            self.calls.append(Call(kind, seconds, list(result.comm_bytes)))

        self.llm.engine.observers.append(record)

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def run(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        from seqpar.engine.sampling import SamplingParams

        self.calls = []
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        out = self.llm.generate(prompt, params)[0]
        wall = time.perf_counter() - t0
        prefill = [c for c in self.calls if c.kind == "prefill"]
        decode = [c for c in self.calls if c.kind == "decode"]
        m = out.metrics
        return {
            "wall_s": wall,
            "ttft_s": m["time_to_first_token_s"],
            "decode_tokens_per_s": m["decode_tokens_per_s"],
            "kv_bytes_after_prefill": m["kv_cache_bytes_per_rank"] if max_tokens == 1 else None,
            "prefill_comm_bytes": [sum(b) for b in zip(*(c.comm_bytes for c in prefill))] if prefill else None,
            "prefill_step_s": sum(c.wall_s for c in prefill) if prefill else None,
            "decode_comm_bytes": [c.comm_bytes for c in decode],
            "decode_step_s": [c.wall_s for c in decode],
            "tokens": list(out.outputs[0].token_ids),
        }

    def shutdown(self) -> None:
        self.llm.shutdown()


def kv_cache_gb_for(model_config: Any, sp: int, tokens: int, block_size: int = 16) -> float:
    """A cache just big enough for one sequence of `tokens` (at least the model's context) on each rank."""
    from seqpar.engine.kv_cache import Placement, block_bytes

    per_block = block_bytes(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                            torch.float32, block_size)
    need = Placement(sp, block_size).blocks_per_rank(max(tokens, model_config.max_position_embeddings))
    return (max(need) + 4) * per_block / 2**30


# ---------------------------------------------------------------- transformers baseline

def hf_model_from(model: str, rope_scaling: dict | None = None) -> Any:
    """transformers' CausalLM with our loaded weights (the converted GGUF cache): same fp32 numbers."""
    import inspect

    import transformers as tf

    from seqpar.model import load_model

    ours, mc = load_model(model, rope_scaling=rope_scaling)  # the same override for transformers (its config below)
    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}
    if mc.architecture not in classes:
        raise ValueError(f"no transformers baseline for architecture {mc.architecture!r}")
    config_cls, model_cls = classes[mc.architecture]
    fields = dict(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
                  num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
                  head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps, max_position_embeddings=mc.max_position_embeddings,
                  tie_word_embeddings=mc.tie_word_embeddings, bos_token_id=mc.bos_token_id,
                  eos_token_id=list(mc.eos_token_ids) or None)
    if mc.architecture == "llama":
        fields["attention_bias"] = mc.attention_bias
    if mc.architecture == "mistral":
        fields["sliding_window"] = None
    rope = {"rope_type": "default", **(mc.rope_scaling or {})}
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:  # transformers 5
        fields["rope_parameters"] = {**rope, "rope_theta": mc.rope_theta}
    else:
        fields["rope_theta"] = mc.rope_theta
        fields["rope_scaling"] = mc.rope_scaling
    hf_config = config_cls(**fields)
    hf_config._attn_implementation = "sdpa"
    hf = model_cls(hf_config).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if mc.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"transformers model does not match ours: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if mc.tie_word_embeddings:
        hf.tie_weights()
    return hf.requires_grad_(False)


def _hf_server(model: str, threads: int, conn: Any, rope_scaling: dict | None = None) -> None:
    """In its own process: build the HF model, then time one prefill forward per prompt received."""
    try:
        torch.set_num_threads(threads)
        hf = hf_model_from(model, rope_scaling)
        conn.send(("ok", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            prompt = conn.recv()
        except EOFError:
            return
        if prompt is None:
            return
        try:
            ids = torch.tensor([prompt], dtype=torch.long)
            with torch.inference_mode():
                t0 = time.perf_counter()
                logits = hf(ids, use_cache=True, logits_to_keep=1).logits[0, -1]
                elapsed = time.perf_counter() - t0
            conn.send(("ok", (elapsed, int(logits.argmax()))))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class HFBaseline:
    def __init__(self, model: str, threads: int, rope_scaling: dict | None = None):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hf_server, args=(model, threads, child, rope_scaling), name="hf-baseline", daemon=True)
        self.proc.start()
        self._answer(600.0)

    def _answer(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError("the transformers baseline process did not answer")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"the transformers baseline failed:\n{value}")
        return value

    def run(self, prompt: list[int]) -> tuple[float, int]:
        self.conn.send(prompt)
        return self._answer(3600.0)

    def shutdown(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


# ---------------------------------------------------------------- the run

@dataclass
class Results:
    prompt_tokens: int = 0
    decode_prompt_tokens: dict[int, int] = field(default_factory=dict)  # requested context -> prompt run
    ttft: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # config key -> per round
    hf: list[tuple[float, int]] = field(default_factory=list)
    hf_error: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # config key -> why it could not run
    decode: dict[int, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)  # context -> key -> rounds


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rotated(items: list[Any], r: int) -> list[Any]:
    if not items:
        return items
    r %= len(items)
    return items[r:] + items[:r]


def log(msg: str) -> None:
    print(f"[bench engine] {msg}", file=sys.stderr, flush=True)


def run_benchmark(args: argparse.Namespace, configs: list[Config]) -> Results:
    from seqpar.model import load_config, load_tokenizer

    mc = load_config(args.model, args.rope_scaling)
    tokenizer = load_tokenizer(args.model)
    context = mc.max_position_embeddings
    res = Results()
    res.prompt_tokens = min(args.prompt_tokens, context - 1)
    contexts = args.decode_contexts
    for c in contexts:
        res.decode_prompt_tokens[c] = max(1, min(c, context - args.decode_tokens))
    longest = max([res.prompt_tokens, *(p + args.decode_tokens for p in res.decode_prompt_tokens.values())])
    base = make_prompt(tokenizer, mc.vocab_size, longest, args.prompt)
    prompt = base[: res.prompt_tokens]
    warm = base[: min(256, res.prompt_tokens)]

    engines: dict[str, Engine] = {}
    hf: HFBaseline | None = None
    try:
        for c in configs:
            t0 = time.perf_counter()
            try:
                engines[c.key] = Engine(c, args.model, kv_cache_gb_for(mc, c.sp, longest), args.rope_scaling,
                                        args.shard_blocks)
            except ValueError as e:  # e.g. a decode merge this model's head count rules out
                if c.ttft:
                    raise
                res.skipped[c.key] = str(e)
                log(f"{c.key}: skipped: {e}")
                continue
            engines[c.key].run(warm, 2)  # warm-up, not timed
            log(f"{c.key}: up in {time.perf_counter() - t0:.1f}s")
        if not args.no_hf:
            try:
                t0 = time.perf_counter()
                hf = HFBaseline(args.model, 2, args.rope_scaling)
                hf.run(warm)
                log(f"hf-2t: up in {time.perf_counter() - t0:.1f}s")
            except Exception as e:  # reported, the rest still runs
                res.hf_error = f"{type(e).__name__}: {e}"
                log(f"transformers baseline unavailable: {res.hf_error}")
                hf = None

        ttft_keys = [c.key for c in configs if c.ttft] + (["hf-2t"] if hf is not None else [])
        for r in range(args.repeats):
            for key in rotated(ttft_keys, r):
                if key == "hf-2t":
                    res.hf.append(hf.run(prompt))
                    log(f"TTFT round {r + 1}: hf-2t {res.hf[-1][0]:.3f}s")
                    continue
                run = engines[key].run(prompt, 1)
                res.ttft.setdefault(key, []).append(run)
                log(f"TTFT round {r + 1}: {key} {run['ttft_s']:.3f}s (wall {run['wall_s']:.3f}s)")

        decode_keys = [c.key for c in configs if c.decode and c.key in engines]
        for ctx in contexts:
            p = base[: res.decode_prompt_tokens[ctx]]
            for r in range(args.repeats):
                for key in rotated(decode_keys, r):
                    run = engines[key].run(p, args.decode_tokens)
                    res.decode.setdefault(ctx, {}).setdefault(key, []).append(run)
                    rate = run["decode_tokens_per_s"]
                    log(f"decode {ctx} round {r + 1}: {key} "
                        f"{'n/a' if not rate else f'{1000 / rate:.1f} ms/token'}")
    finally:
        for e in engines.values():
            e.shutdown()
        if hf is not None:
            hf.shutdown()
    return res


# ---------------------------------------------------------------- report

def summarize(res: Results, configs: list[Config], args: argparse.Namespace) -> dict[str, Any]:
    by_key = {c.key: c for c in configs}
    s: dict[str, Any] = {"ttft": {}, "decode": {}, "memory": {}, "exact": {}, "targets": {}}
    for key, runs in res.ttft.items():
        s["ttft"][key] = {
            "ttft_s": median([r["ttft_s"] for r in runs]),
            "wall_s": median([r["wall_s"] for r in runs]),
            "samples_ttft_s": [r["ttft_s"] for r in runs],
            "samples_wall_s": [r["wall_s"] for r in runs],
            "first_token": runs[0]["tokens"][0],
            "first_tokens_agree_across_rounds": len({r["tokens"][0] for r in runs}) == 1,
            "kv_bytes_per_rank": runs[0]["kv_bytes_after_prefill"],
            "prefill_comm_bytes_per_rank": runs[0]["prefill_comm_bytes"],
        }
    if res.hf:
        s["ttft"]["hf-2t"] = {"ttft_s": median([t for t, _ in res.hf]), "wall_s": None,
                              "samples_ttft_s": [t for t, _ in res.hf], "first_token": res.hf[0][1]}
    for ctx, per in res.decode.items():
        s["decode"][ctx] = {}
        for key, runs in per.items():
            rates = [r["decode_tokens_per_s"] for r in runs]
            steps = [t for r in runs for t in r["decode_step_s"]]
            comm = [b for r in runs for b in r["decode_comm_bytes"]]
            per_rank = [statistics.mean(col) for col in zip(*comm)] if comm and comm[0] else None
            s["decode"][ctx][key] = {
                "prompt_tokens": res.decode_prompt_tokens[ctx],
                "ms_per_token": median([1000.0 / x if x else None for x in rates]),
                "samples_ms_per_token": [1000.0 / x if x else None for x in rates],
                "median_step_ms": 1000.0 * statistics.median(steps) if steps else None,
                "comm_bytes_per_token_per_rank": per_rank,
                "kv_bytes_per_rank_after_prefill": runs[0]["kv_bytes_after_prefill"],
                "tokens": runs[0]["tokens"],
                "tokens_agree_across_rounds": all(r["tokens"] == runs[0]["tokens"] for r in runs),
            }
    # exactness: SP 2 (every merge) against SP 1 at each context; first token of every TTFT row
    checks: dict[str, bool] = {}
    firsts = {k: v["first_token"] for k, v in s["ttft"].items()}
    if firsts:
        ref = firsts.get("sp1-1t", next(iter(firsts.values())))
        for k, tok in firsts.items():
            checks[f"first token {k} == sp1-1t"] = tok == ref
    for ctx, per in s["decode"].items():
        ref_key = "sp1-2t" if "sp1-2t" in per else None
        if ref_key is None:
            continue
        for key, d in per.items():
            if key != ref_key:
                checks[f"{args.decode_tokens} greedy tokens at context {ctx}: {key} == {ref_key}"] = d["tokens"] == per[ref_key]["tokens"]
            checks[f"{key} at context {ctx}: same tokens every round"] = d["tokens_agree_across_rounds"]
    s["exact"] = checks
    # targets
    t = s["ttft"]
    sp1, sp2, hf = (t.get(k, {}).get("ttft_s") for k in ("sp1-1t", "sp2", "hf-2t"))
    tg: dict[str, Any] = {}
    if sp1 and sp2:
        tg["ttft_sp2_vs_sp1_1t"] = {"ratio": sp2 / sp1, "target": TARGET_TTFT_VS_SP1, "met": sp2 / sp1 <= TARGET_TTFT_VS_SP1}
    if hf and sp2:
        tg["ttft_sp2_vs_hf_2t"] = {"ratio": sp2 / hf, "target": TARGET_TTFT_VS_HF, "met": sp2 / hf <= TARGET_TTFT_VS_HF}
    kv1 = (t.get("sp1-1t") or {}).get("kv_bytes_per_rank")
    kv2 = (t.get("sp2") or {}).get("kv_bytes_per_rank")
    if kv1 and kv2:
        ratio = max(kv2) / kv1[0]
        tg["kv_bytes_per_rank_sp2_vs_sp1"] = {"ratio": ratio, "target": TARGET_KV_RATIO, "met": ratio <= TARGET_KV_RATIO}
    if s["decode"]:
        top = max(s["decode"])
        per = s["decode"][top]
        base = (per.get("sp1-2t") or {}).get("ms_per_token")
        for key, d in per.items():
            if key != "sp1-2t" and base and d["ms_per_token"]:
                ratio = d["ms_per_token"] / base
                rounds = [a / b for a, b in zip(d["samples_ms_per_token"], per["sp1-2t"]["samples_ms_per_token"])
                          if a and b]  # sample i of every configuration comes from round i
                tg[f"decode_{top}_{key}_vs_sp1_2t"] = {"ratio": ratio, "target": 1.0, "met": ratio <= 1.0,
                                                       "per_round": rounds}
    s["targets"] = tg
    s["labels"] = {c.key: c.label for c in configs} | {"hf-2t": "transformers, 2 threads"}
    s["shapes"] = {c.key: c.shape for c in configs} | {"hf-2t": "1 x 2"}
    s["decode_labels"] = {c.key: decode_label(c) for c in configs if c.decode}
    _ = by_key
    return s


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _mib(b: int | float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.2f} MiB"


def _bytes(b: int | float | None) -> str:
    if b is None:
        return "n/a"
    if b >= 2**20:
        return f"{b / 2**20:.2f} MiB"
    if b >= 2**10:
        return f"{b / 2**10:.1f} KiB"
    return f"{b:.0f} B"


def format_report(s: dict[str, Any], res: Results, args: argparse.Namespace) -> str:
    lines: list[str] = []
    t = s["ttft"]
    sp1, hf = (t.get(k, {}).get("ttft_s") for k in ("sp1-1t", "hf-2t"))
    if t:
        lines += [f"Time to first token, {res.prompt_tokens}-token prompt (median of {args.repeats}):", "",
                  "| configuration | ranks x threads | TTFT (s), engine metric | fastest round (s) | wall (s) | vs SP 1, 1 thread | vs transformers, 2 threads | first token |",
                  "|---|---|---|---|---|---|---|---|"]
    for key in ("sp1-1t", "sp2", "sp1-2t", "hf-2t"):
        if key not in t:
            continue
        r = t[key]
        lines.append(f"| {s['labels'][key]} | {s['shapes'][key]} | {_f(r['ttft_s'])} | {_f(min(r['samples_ttft_s']))} | {_f(r.get('wall_s'))} | "
                     f"{_f(r['ttft_s'] / sp1 if sp1 else None, '{:.2f}x')} | {_f(r['ttft_s'] / hf if hf else None, '{:.2f}x')} | "
                     f"{r['first_token']} |")
    if res.hf_error:
        lines.append(f"\ntransformers baseline not run: {res.hf_error}")
    for key, why in res.skipped.items():
        lines.append(f"\n{key} not run: {why}")
    if s["decode"]:
        lines += ["", f"Decode, {args.decode_tokens} tokens after the prompt (ms/token = 1000 / metrics decode_tokens_per_s, "
                      f"median of {args.repeats}):", "",
                  "| configuration | ranks x threads | context (prompt tokens) | ms/token | fastest round | vs SP 1, 2 threads | bytes sent per token per rank |",
                  "|---|---|---|---|---|---|---|"]
        for ctx, per in s["decode"].items():
            base = (per.get("sp1-2t") or {}).get("ms_per_token")
            for key, d in sorted(per.items(), key=lambda kv: kv[0] != "sp1-2t"):
                comm = d["comm_bytes_per_token_per_rank"]
                lines.append(f"| {s['decode_labels'][key]} | {s['shapes'][key]} | {ctx} ({d['prompt_tokens']}) | "
                             f"{_f(d['ms_per_token'], '{:.1f}')} | {_f(min(d['samples_ms_per_token'], default=None), '{:.1f}')} | "
                             f"{_f(d['ms_per_token'] / base if base and d['ms_per_token'] else None, '{:.2f}x')} | "
                             f"{', '.join(_bytes(b) for b in comm) if comm else 'n/a'} |")
    if t:
        lines += ["", f"Memory and communication after prefill of the {res.prompt_tokens}-token prompt:", "",
                  "| configuration | KV cache bytes per rank | vs SP 1 | bytes sent per rank in prefill |", "|---|---|---|---|"]
    kv1 = (t.get("sp1-1t") or {}).get("kv_bytes_per_rank")
    for key in ("sp1-1t", "sp2", "sp1-2t"):
        if key not in t or not t[key].get("kv_bytes_per_rank"):
            continue
        kv = t[key]["kv_bytes_per_rank"]
        comm = t[key]["prefill_comm_bytes_per_rank"]
        lines.append(f"| {s['labels'][key]} | {', '.join(_mib(b) for b in kv)} | "
                     f"{_f(max(kv) / kv1[0] if kv1 else None, '{:.3f}x')} | {', '.join(_bytes(b) for b in comm) if comm else 'n/a'} |")
    lines += ["", "Exactness (greedy):", ""]
    rounds = {n: ok for n, ok in s["exact"].items() if n.endswith("every round")}
    for name, ok in s["exact"].items():
        if name not in rounds:
            lines.append(f"- {'OK  ' if ok else 'FAIL'} {name}")
    if rounds:
        bad = [n for n, ok in rounds.items() if not ok]
        lines.append(f"- {'FAIL' if bad else 'OK  '} every configuration gave the same tokens in every round"
                     + (f" (not: {'; '.join(bad)})" if bad else ""))
    if s["targets"]:
        lines += ["", "Targets:", ""]
        for name, tg in s["targets"].items():
            rounds = f"; per round {', '.join(f'{r:.2f}' for r in tg['per_round'])}" if tg.get("per_round") else ""
            lines.append(f"- {'MET   ' if tg['met'] else 'MISSED'} {name}: {tg['ratio']:.3f} (target <= {tg['target']}){rounds}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seqpar bench engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="known model name, GGUF file or HF directory (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                   help="prompt length for time to first token (default: 8192, capped at the model's context - 1)")
    p.add_argument("--decode-contexts", default=None, metavar="C1,C2",
                   help="contexts at which decode is timed (default: 1024,8192)")
    p.add_argument("--decode-tokens", type=int, default=None, metavar="K", help="tokens decoded per run (default: 32)")
    p.add_argument("--repeats", type=int, default=None, metavar="R", help="measurement rounds; medians reported (default: 3)")
    p.add_argument("--merges", default=",".join(DECODE_MERGES), metavar="M1,M2",
                   help="decode merges timed at SP 2, the first also used for SP 2's TTFT (default: %(default)s; '' = no decode)")
    p.add_argument("--prompt", choices=("text", "random"), default="text",
                   help="token ids from the tokenizer on generated text, or pseudo-random ids (default: %(default)s)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--rope-scaling", type=json.loads, default=None, metavar="JSON",
                   help="RoPE scaling override for seqpar and transformers alike, to run past the model's context, "
                        'e.g. \'{"rope_type":"yarn","factor":4,"original_max_position_embeddings":8192}\'')
    p.add_argument("--shard-blocks", type=int, default=None, metavar="B",
                   help="KV blocks per SP shard unit (default: the engine's 16)")
    p.add_argument("--decode-only", action="store_true", help="time decode only (no TTFT rounds, no transformers)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--json", metavar="PATH", help="write every sample and the summary as JSON")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else dict(prompt_tokens=8192, decode_contexts="1024,8192", decode_tokens=32, repeats=3,
                                             shard_blocks=16)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.decode_contexts = [int(c) for c in str(args.decode_contexts).split(",") if c.strip()]
    except ValueError:
        p.error(f"--decode-contexts must be comma-separated integers, got {args.decode_contexts!r}")
    merges = [m for m in args.merges.split(",") if m]
    bad = [m for m in merges if m not in DECODE_MERGES]
    if bad:
        p.error(f"unknown decode merge(s) {', '.join(bad)}; choose from {', '.join(DECODE_MERGES)}")
    args.merges = merges
    if not args.merges:
        args.decode_contexts = []
    for name in ("prompt_tokens", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.decode_tokens < 2 and args.decode_contexts:
        p.error("--decode-tokens must be >= 2 to time decode")
    if any(c < 1 for c in args.decode_contexts):
        p.error("--decode-contexts must be positive")
    return args


def machine() -> dict[str, Any]:
    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:  # the code measured, when run from a checkout
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = build_configs(args.merges)
    if args.decode_only:
        configs = [dataclasses.replace(c, ttft=False) for c in configs if c.decode]
        args.no_hf = True
    info = machine()
    header = (f"seqpar engine benchmark: model {args.model}, fp32, greedy; {args.repeats} round(s); "
              f"{info['cpus']} CPUs ({info.get('cpu') or platform.machine()}), torch {info['torch']}"
              + (f", commit {info['commit']}" if info.get("commit") else ""))
    log(header)
    res = run_benchmark(args, configs)
    s = summarize(res, configs, args)
    print(f"\n{header}\n")
    print(format_report(s, res, args))
    if args.json:
        payload = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "machine": info,
                   "prompt_tokens": res.prompt_tokens, "decode_prompt_tokens": res.decode_prompt_tokens,
                   "summary": s,
                   "raw": {"ttft": res.ttft, "hf": res.hf, "decode": {str(k): v for k, v in res.decode.items()}},
                   "hf_error": res.hf_error, "skipped": res.skipped}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    return 0 if all(s["exact"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
