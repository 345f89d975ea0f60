"""The engine benchmark's summary (medians, exactness, targets) and its printed tables."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from seqpar.bench.engine.rows import (
    TARGET_KV_RATIO,
    TARGET_TTFT_VS_HF,
    TARGET_TTFT_VS_SP1,
    Config,
    decode_label,
)
from seqpar.bench.engine.runner import Results, median

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
        s["ttft"]["hf-2t"] = {
            "ttft_s": median([t for t, _ in res.hf]),
            "wall_s": None,
            "samples_ttft_s": [t for t, _ in res.hf],
            "first_token": res.hf[0][1],
        }
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
                checks[f"{args.decode_tokens} greedy tokens at context {ctx}: {key} == {ref_key}"] = (
                    d["tokens"] == per[ref_key]["tokens"]
                )
            checks[f"{key} at context {ctx}: same tokens every round"] = d["tokens_agree_across_rounds"]
    # vLLM (another engine, maybe another dtype): its agreement is reported, not required
    s["vllm_agreement"] = {n: ok for n, ok in checks.items() if "vllm" in n}
    s["exact"] = {n: ok for n, ok in checks.items() if "vllm" not in n}
    # targets
    t = s["ttft"]
    sp1, sp2, hf = (t.get(k, {}).get("ttft_s") for k in ("sp1-1t", "sp2", "hf-2t"))
    tg: dict[str, Any] = {}
    if sp1 and sp2:
        tg["ttft_sp2_vs_sp1_1t"] = {
            "ratio": sp2 / sp1,
            "target": TARGET_TTFT_VS_SP1,
            "met": sp2 / sp1 <= TARGET_TTFT_VS_SP1,
        }
    if hf and sp2:
        tg["ttft_sp2_vs_hf_2t"] = {"ratio": sp2 / hf, "target": TARGET_TTFT_VS_HF, "met": sp2 / hf <= TARGET_TTFT_VS_HF}
    kv1 = (t.get("sp1-1t") or {}).get("kv_bytes_per_rank")
    kv2 = (t.get("sp2") or {}).get("kv_bytes_per_rank")
    if kv1 and kv2:
        ratio = max(kv2) / kv1[0]
        tg["kv_bytes_per_rank_sp2_vs_sp1"] = {
            "ratio": ratio,
            "target": TARGET_KV_RATIO,
            "met": ratio <= TARGET_KV_RATIO,
        }
    if s["decode"]:
        top = max(s["decode"])
        per = s["decode"][top]
        base = (per.get("sp1-2t") or {}).get("ms_per_token")
        for key, d in per.items():
            if key not in ("sp1-2t", "vllm") and base and d["ms_per_token"]:
                ratio = d["ms_per_token"] / base
                rounds = [
                    a / b for a, b in zip(d["samples_ms_per_token"], per["sp1-2t"]["samples_ms_per_token"]) if a and b
                ]  # sample i of every configuration comes from round i
                tg[f"decode_{top}_{key}_vs_sp1_2t"] = {
                    "ratio": ratio,
                    "target": 1.0,
                    "met": ratio <= 1.0,
                    "per_round": rounds,
                }
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
        lines += [
            f"Time to first token, {res.prompt_tokens}-token prompt (median of {args.repeats}):",
            "",
            "| configuration | ranks x threads | TTFT (s), engine metric | fastest round (s) | wall (s) "
            "| vs SP 1, 1 thread | vs transformers, 2 threads | first token |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for key in ("sp1-1t", "sp2", "sp1-2t", "hf-2t", "vllm"):
        if key not in t:
            continue
        r = t[key]
        lines.append(
            f"| {s['labels'][key]} | {s['shapes'][key]} | {_f(r['ttft_s'])} | {_f(min(r['samples_ttft_s']))} "
            f"| {_f(r.get('wall_s'))} | {_f(r['ttft_s'] / sp1 if sp1 else None, '{:.2f}x')} "
            f"| {_f(r['ttft_s'] / hf if hf else None, '{:.2f}x')} | "
            f"{r['first_token']} |"
        )
    if res.hf_error:
        lines.append(f"\ntransformers baseline not run: {res.hf_error}")
    for key, why in res.skipped.items():
        lines.append(f"\n{key} not run: {why}")
    if s["decode"]:
        lines += [
            "",
            f"Decode, {args.decode_tokens} tokens after the prompt (ms/token = 1000 / metrics decode_tokens_per_s, "
            f"median of {args.repeats}):",
            "",
            "| configuration | ranks x threads | context (prompt tokens) | ms/token | fastest round "
            "| vs SP 1, 2 threads | bytes sent per token per rank |",
            "|---|---|---|---|---|---|---|",
        ]
        for ctx, per in s["decode"].items():
            base = (per.get("sp1-2t") or {}).get("ms_per_token")
            for key, d in sorted(per.items(), key=lambda kv: kv[0] != "sp1-2t"):
                comm = d["comm_bytes_per_token_per_rank"]
                lines.append(
                    f"| {s['decode_labels'][key]} | {s['shapes'][key]} | {ctx} ({d['prompt_tokens']}) | "
                    f"{_f(d['ms_per_token'], '{:.1f}')} "
                    f"| {_f(min(d['samples_ms_per_token'], default=None), '{:.1f}')} | "
                    f"{_f(d['ms_per_token'] / base if base and d['ms_per_token'] else None, '{:.2f}x')} | "
                    f"{', '.join(_bytes(b) for b in comm) if comm else 'n/a'} |"
                )
    if t:
        lines += [
            "",
            f"Memory and communication after prefill of the {res.prompt_tokens}-token prompt:",
            "",
            "| configuration | KV cache bytes per rank | vs SP 1 | bytes sent per rank in prefill |",
            "|---|---|---|---|",
        ]
    kv1 = (t.get("sp1-1t") or {}).get("kv_bytes_per_rank")
    for key in ("sp1-1t", "sp2", "sp1-2t"):
        if key not in t or not t[key].get("kv_bytes_per_rank"):
            continue
        kv = t[key]["kv_bytes_per_rank"]
        comm = t[key]["prefill_comm_bytes_per_rank"]
        lines.append(
            f"| {s['labels'][key]} | {', '.join(_mib(b) for b in kv)} | "
            f"{_f(max(kv) / kv1[0] if kv1 else None, '{:.3f}x')} "
            f"| {', '.join(_bytes(b) for b in comm) if comm else 'n/a'} |"
        )
    lines += ["", "Exactness (greedy):", ""]
    rounds = {n: ok for n, ok in s["exact"].items() if n.endswith("every round")}
    for name, ok in s["exact"].items():
        if name not in rounds:
            lines.append(f"- {'OK  ' if ok else 'FAIL'} {name}")
    if rounds:
        bad = [n for n, ok in rounds.items() if not ok]
        lines.append(
            f"- {'FAIL' if bad else 'OK  '} every configuration gave the same tokens in every round"
            + (f" (not: {'; '.join(bad)})" if bad else "")
        )
    if s.get("vllm_agreement"):
        lines += ["", "vLLM's greedy tokens against seqpar's (information, not required):", ""]
        lines += [f"- {'same' if ok else 'DIFFERENT'}: {n}" for n, ok in s["vllm_agreement"].items()]
    if s["targets"]:
        lines += ["", "Targets:", ""]
        for name, tg in s["targets"].items():
            rounds = f"; per round {', '.join(f'{r:.2f}' for r in tg['per_round'])}" if tg.get("per_round") else ""
            lines.append(
                f"- {'MET   ' if tg['met'] else 'MISSED'} {name}: {tg['ratio']:.3f} (target <= {tg['target']}){rounds}"
            )
    return "\n".join(lines)
