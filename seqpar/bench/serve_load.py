"""The serving benchmark's workload and its two load drivers.

Workload: long-document questions. Request i gets its own document (seqpar/data/harrowmere.txt,
its paragraphs rotated to start at a different place, under a header naming record i, with a
needle sentence for record i), a question only the needle answers, asked before and after the
document, rendered with the model's chat template and cut to `prompt_tokens`. Every request's
first tokens differ, so no prefix cache (seqpar's, or llama.cpp's reuse of the previous prompt)
can skip a prefill. The rendered text goes to `/v1/completions`, so every server reads the same
text (llama.cpp's server takes text only).

Drivers: guidellm (a load generator kept by the vLLM project; run from its own virtualenv and
read back from its JSON report) or the `openai` async client. Both keep `concurrency` streams
busy (a stream sends its next request when its last one ends) until `requests` were sent, and
both report the same figures over the successful requests: TTFT (request sent to first token),
ITL ((last token - first token) / (output tokens - 1), per request), end-to-end latency, p50
and p99 by nearest rank (guidellm's percentiles; with 8 requests p99 is the slowest one), and
output tokens/s = all output tokens / the level's wall time.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

CODES = ("AMBER", "BIRCH", "CEDAR", "DELTA", "EMBER", "FROST", "GROVE", "HAVEN", "IVORY", "JADE")


def percentile(values: list[float], p: float) -> float:
    """Nearest rank (what guidellm reports): the smallest value with at least p% at or below it."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def _render(tokenizer: Any, content: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content


def _ask(tokenizer: Any, question: str, doc: str) -> str:
    return _render(tokenizer, f"{question}\n\n{doc}\n\n{question}")


def workload(tokenizer: Any, n: int, prompt_tokens: int, output_tokens: int, first: int = 0) -> list[dict[str, Any]]:
    """Rows `first` .. `first + n - 1`: {prompt, prompt_tokens_count, output_tokens_count} (guidellm's columns)."""
    text = resources.files("seqpar.data").joinpath("harrowmere.txt").read_text(encoding="utf-8")
    paragraphs = text.strip().split("\n\n")
    rows = []
    for i in range(first, first + n):
        code = f"{CODES[i % len(CODES)]}-{(i * 37) % 90 + 10}"
        question = f"What is the vault code of archive {i}? Answer with the code only."
        start = (i * 11) % len(paragraphs)
        body = paragraphs[start:] + paragraphs[:start]
        body.insert(1 + (i * 7) % (len(body) // 2), f"The vault code of archive {i} is {code}.")
        doc = f"Archive record {i}.\n\n" + "\n\n".join(body * 2)  # twice: room for prompts past one copy

        overhead = len(tokenizer.encode(_ask(tokenizer, question, ""), add_special_tokens=False))
        doc_ids = tokenizer.encode(doc, add_special_tokens=False)[: max(1, prompt_tokens - overhead)]
        text = _ask(tokenizer, question, tokenizer.decode(doc_ids))
        rows.append(
            {
                "prompt": text,
                "prompt_tokens_count": len(tokenizer.encode(text, add_special_tokens=False)),
                "output_tokens_count": output_tokens,
            }
        )
    return rows


def summarize(records: list[dict[str, Any]], errors: int, wall_s: float) -> dict[str, Any]:
    """The level's figures from per-request records {ttft_s, itl_s, e2e_s, prompt_tokens, output_tokens}."""
    out: dict[str, Any] = {"requests": len(records), "errors": errors, "duration_s": wall_s}
    if not records:
        return out
    for key, scale, name in (("ttft_s", 1, "ttft_s"), ("itl_s", 1000, "itl_ms"), ("e2e_s", 1, "e2e_s")):
        vals = [r[key] * scale for r in records if r.get(key) is not None]
        if vals:
            out[name] = {"p50": percentile(vals, 50), "p99": percentile(vals, 99), "mean": sum(vals) / len(vals)}
    out["output_tokens_per_s"] = sum(r["output_tokens"] for r in records) / wall_s
    out["prompt_tokens_p50"] = percentile([r["prompt_tokens"] for r in records], 50)
    out["output_tokens_p50"] = percentile([r["output_tokens"] for r in records], 50)
    out["output_tokens_min"] = min(r["output_tokens"] for r in records)
    return out


# ---- guidellm --------------------------------------------------------------------------
def run_guidellm(
    exe: str,
    target: str,
    model: str,
    rows: list[dict[str, Any]],
    tokenizer_dir: str,
    concurrency: int,
    workdir: Path,
    tag: str,
    extras: dict[str, Any] | None = None,
    health_route: str | None = None,
) -> dict[str, Any]:
    data, scenario = workdir / f"{tag}.jsonl", workdir / f"{tag}.scenario.json"
    report = workdir / f"{tag}.guidellm.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    backend: dict[str, Any] = {
        "kind": "openai_http",
        "target": target,
        "model": model,
        "request_format": "/v1/completions",
        "http2": False,
        "timeout": 3600,
    }
    if extras:
        backend["extras"] = {"body": extras}
    if health_route:  # llama.cpp's server has no /health: guidellm checks this route instead
        backend["api_routes"] = {"/health": health_route}
    scenario.write_text(
        json.dumps(
            {
                "spec": {
                    "backend": backend,
                    "profile": {"kind": "concurrent", "streams": concurrency},
                    "data": [{"kind": "json_file", "path": str(data)}],
                    "tokenizer": {"kind": "huggingface_auto", "model": tokenizer_dir},
                    "constraints": [{"kind": "max_requests", "count": len(rows)}],
                    "outputs": [{"kind": "json", "path": str(report)}],
                }
            },
            indent=1,
        )
    )
    with open(workdir / f"{tag}.guidellm.log", "w") as log:
        subprocess.run(
            [exe, "run", "-c", str(scenario), "--disable-console-interactive"],
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return parse_guidellm(report)


def parse_guidellm(report: Path) -> dict[str, Any]:
    """Per-request timings from guidellm's report, summarized like the openai driver's."""
    bench = json.loads(report.read_text())["benchmarks"][0]
    records = []
    for r in bench["requests"]["successful"]:
        t, n_out = r["info"]["timings"], r["output_metrics"]["text_tokens"]
        first, last = t["first_token_iteration"], t["last_token_iteration"]
        records.append(
            {
                "ttft_s": first - t["request_start"],
                "e2e_s": t["request_end"] - t["request_start"],
                "itl_s": (last - first) / (n_out - 1) if n_out > 1 else None,
                "prompt_tokens": r["input_metrics"]["text_tokens"],
                "output_tokens": n_out,
            }
        )
    totals = bench["metrics"]["request_totals"]
    out = summarize(records, totals["errored"] + totals["incomplete"], bench["duration"])
    m = bench["metrics"]  # guidellm's own percentiles, kept to cross-check ours
    out["guidellm"] = {
        k: {p: m[k]["successful"]["percentiles"][p] for p in ("p50", "p99")}
        for k in ("time_to_first_token_ms", "inter_token_latency_ms", "request_latency")
    }
    out["errors_seen"] = [str(r["info"].get("error"))[:300] for r in bench["requests"]["errored"]][:3]
    return out


# ---- the openai client -----------------------------------------------------------------
async def _one(client: Any, model: str, row: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = last = None
    usage = None
    stream = await client.completions.create(
        model=model,
        prompt=row["prompt"],
        max_tokens=row["output_tokens_count"],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **extras},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    if usage is None or first is None:
        raise RuntimeError("the stream ended without tokens or usage")
    n_out = usage.completion_tokens
    return {
        "ttft_s": first - t0,
        "e2e_s": end - t0,
        "itl_s": (last - first) / (n_out - 1) if n_out > 1 else None,
        "prompt_tokens": usage.prompt_tokens,
        "output_tokens": n_out,
    }


async def _drive(
    base_url: str, model: str, rows: list[dict[str, Any]], concurrency: int, extras: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str], float]:
    from openai import AsyncOpenAI

    queue = list(rows)
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    async with AsyncOpenAI(base_url=base_url, api_key="unused", timeout=3600, max_retries=0) as client:

        async def stream() -> None:
            while queue:
                row = queue.pop(0)
                try:
                    records.append(await _one(client, model, row, extras))
                except Exception as e:  # counted, as guidellm counts errored requests
                    errors.append(f"{type(e).__name__}: {e}"[:300])

        t0 = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(concurrency)))
        return records, errors, time.perf_counter() - t0


def run_openai(
    base_url: str, model: str, rows: list[dict[str, Any]], concurrency: int, extras: dict[str, Any] | None = None
) -> dict[str, Any]:
    records, errors, wall = asyncio.run(_drive(base_url, model, rows, concurrency, extras or {}))
    out = summarize(records, len(errors), wall)
    out["errors_seen"] = errors[:3]
    return out
