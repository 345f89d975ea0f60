"""The serving benchmark's paired checks, each pair's two runs taken close together and in
alternating order, so both see the same background load.

The server's overhead: a 1-token request through HTTP against `LLM.generate` on the same
prompt in this process, with the engine configured as the server's (the server's ranks sleep
while the in-process engine runs, and the other way round). SP 2 against SP 1: both servers up
side by side, each row a 1-token request to one, then the other.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from seqpar.bench.serve_load import run_openai
from seqpar.bench.serve_servers import RunningServer, server_specs


def one_token(args: argparse.Namespace, server: RunningServer, prompt: str) -> dict[str, Any]:
    """A 1-token request through HTTP vs LLM.generate on the same prompt, paired, alternating order."""
    import httpx

    from seqpar.engine.args import add_engine_args, engine_config
    from seqpar.engine.llm import LLM
    from seqpar.engine.sampling_params import SamplingParams

    flags = argparse.ArgumentParser()
    add_engine_args(flags)
    llm = LLM(engine_config(flags.parse_args(server.spec.engine_args)))  # the served engine's own flags
    body = {"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0.0}

    def http() -> tuple[float, str]:
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["choices"][0]["text"]

    def generate() -> tuple[float, str]:
        t0 = time.perf_counter()
        out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1))
        return time.perf_counter() - t0, out[0].outputs[0].text

    try:
        http(), generate()  # warm-up, untimed
        pairs = []
        for k in range(args.one_token_pairs):
            order = (http, generate) if k % 2 == 0 else (generate, http)
            res = {fn.__name__: fn() for fn in order}
            pairs.append(
                {
                    "first": order[0].__name__,
                    "http_s": res["http"][0],
                    "generate_s": res["generate"][0],
                    "same_text": res["http"][1] == res["generate"][1],
                }
            )
    finally:
        llm.shutdown()
    h = statistics.median(p["http_s"] for p in pairs)
    g = statistics.median(p["generate_s"] for p in pairs)
    return {
        "server": server.spec.name,
        "pairs": pairs,
        "http_median_s": h,
        "generate_median_s": g,
        "ratio": h / g,
        "ratio_per_pair_median": statistics.median(p["http_s"] / p["generate_s"] for p in pairs),
        "target": 1.1,
        "met": h / g <= 1.1,
        "same_text": all(p["same_text"] for p in pairs),
    }


def ttft_pairs(
    args: argparse.Namespace, eos_ids: list[int], workdir: Path, rows: list[dict[str, Any]], warm: dict[str, Any]
) -> dict[str, Any]:
    """SP 1 and SP 2 up side by side, idle in turn: each row goes to one, then the other (the order
    alternating), as a 1-token request, so the time is the time to first token. Pairs taken close
    together see the same background load, which a whole level per server cannot promise."""
    from seqpar.comm.launch import free_port

    servers = {}
    try:
        for name in ("sp1", "sp2"):
            port = free_port()
            spec = server_specs(argparse.Namespace(**{**vars(args), "servers": name}), port, eos_ids)[0]
            servers[name] = RunningServer(spec, port, workdir / f"{name}.pairs.server.log")
            run_openai(servers[name].url + "/v1", "bench", [warm], 1)
        pairs = []
        for k, row in enumerate(rows):
            order = ("sp1", "sp2") if k % 2 == 0 else ("sp2", "sp1")
            times = {}
            for name in order:
                r = run_openai(servers[name].url + "/v1", "bench", [{**row, "output_tokens_count": 1}], 1)
                times[name] = r["e2e_s"]["p50"] if r["requests"] else None
            pairs.append({"first": order[0], **times})
    finally:
        for server in servers.values():
            server.stop()
    ok = [p for p in pairs if p["sp1"] and p["sp2"]]
    t1, t2 = (statistics.median(p[n] for p in ok) for n in ("sp1", "sp2"))
    return {
        "pairs": pairs,
        "sp1_median_s": t1,
        "sp2_median_s": t2,
        "ratio": t2 / t1,
        "ratio_per_pair_median": statistics.median(p["sp2"] / p["sp1"] for p in ok),
        "target": 0.55,
        "met": t2 / t1 <= 0.55,
    }
