"""`seqpar tune`: measure this machine's rates and save them as the engine's machine profile.

    seqpar tune [--model smollm2-135m] [--quick] [--output PATH]

Compute rates are measured twice: in two rank processes at once with one thread each (how SP 2
runs on two cores: both ranks busy, sharing caches and memory bandwidth), and in this process
with every core (how SP 1 runs). The links are measured between those two ranks: gloo's paired
isend/irecv (the ring's exchange), all-to-all and all-gather, and the shared-memory exchange.
A link's latency is the time of its smallest message, its bandwidth the slope from there to the
largest. Every figure is the median of a few repetitions after a warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from seqpar.costmodel import formulas as f
from seqpar.costmodel.profile import COMPUTE_KEYS, Link, MachineProfile, Rates, profile_path
from seqpar.model.config import ModelConfig
from seqpar.model.loader import DEFAULT_MODEL

FULL = dict(
    gemm_rows=(1, 16, 64, 256, 1024, 4096),
    causal_rows=(64, 256, 1024, 2048),
    full_rows=(1, 16, 64, 256, 1024),
    full_keys=2048,
    copy_bytes=(1 << 16, 1 << 22, 1 << 25),
    link_bytes=(256, 1 << 16, 1 << 20, 1 << 23),
    shm_bytes=(256, 1 << 16, 1 << 20, 1 << 22),
    reps=5,
)
QUICK = dict(
    gemm_rows=(1, 16, 64),
    causal_rows=(16, 64),
    full_rows=(1, 16),
    full_keys=64,
    copy_bytes=(1 << 12, 1 << 16),
    link_bytes=(256, 1 << 14),
    shm_bytes=(256, 1 << 14),
    reps=1,
)


def _seconds(reps: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Median seconds of fn(*args, **kwargs) over `reps` calls after a warm-up."""
    fn(*args, **kwargs)  # warm-up: first-call allocations, kernel selection
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_compute(mc: ModelConfig, sizes: dict[str, Any]) -> dict[str, list[list[float]]]:
    """This process's rates at its current thread count (SmolLM-sized shapes run in seconds)."""
    from seqpar.model.llama import LlamaForCausalLM

    reps, hq, hkv, d = sizes["reps"], mc.num_heads, mc.num_kv_heads, mc.head_dim
    out: dict[str, Any] = {k: [] for k in COMPUTE_KEYS}
    with torch.inference_mode():
        weights = [
            torch.randn(o, i)
            for o, i in (
                (hq * d, mc.hidden_size),
                (hkv * d, mc.hidden_size),
                (hkv * d, mc.hidden_size),
                (mc.hidden_size, hq * d),
                (mc.intermediate_size, mc.hidden_size),
                (mc.intermediate_size, mc.hidden_size),
                (mc.hidden_size, mc.intermediate_size),
            )
        ]
        params = sum(w.numel() for w in weights)
        # Two layers stand for all: every layer has the same shapes. Random weights: speed does not
        # depend on values. Attention is stubbed out (it returns its queries), so this is the rest.
        small = dataclasses.replace(mc, num_layers=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(small).eval()
        for n in sizes["gemm_rows"]:
            x, h = torch.randn(n, mc.hidden_size), torch.randn(n, mc.intermediate_size)
            s = _seconds(reps, _linears, x, h, weights)
            out["gemm"].append([n, 2 * n * params / s])
            ids, pos = torch.randint(0, mc.vocab_size, (n,)), torch.arange(n)
            s = _seconds(reps, model, ids, pos, _stub_attention)
            out["linear"].append([n, f.linear_flops(small, n) / s])
        flop = 4 * d * hq
        sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        for n in sizes["causal_rows"]:
            q, k, v = torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)
            s = _seconds(reps, sdpa, q, k, v, 0.0, is_causal=True, scale=d**-0.5)
            out["attention_causal"].append([n, flop * n * (n + 1) / 2 / s])
        m = sizes["full_keys"]
        k, v = torch.randn(1, hkv, m, d), torch.randn(1, hkv, m, d)
        for n in sizes["full_rows"]:
            # GQA folded into rows, as the engine's kernel calls an unmasked block
            q = torch.randn(1, hkv, (hq // hkv) * n, d)
            s = _seconds(reps, sdpa, q, k, v, 0.0, scale=d**-0.5)
            out["attention_full"].append([n, flop * n * m / s])
        # One kernel call on a tiny block, through the engine's entry (accumulators, merge): its cost
        # is almost all fixed; pass-Q pays it per stretch of storage its keys lie in.
        from seqpar.kernels.attention import attend_into_head_major, new_accumulators
        from seqpar.kernels.layout import Run, TokenLayout

        qs, ks = torch.randn(16, hq, d), torch.randn(hkv, 16, d)
        lay_q = TokenLayout.from_runs([Run(0, 16, 0, 16, 1)])
        lay_k = TokenLayout.from_runs([Run(0, 16, 0, 0, 1)])
        acc = new_accumulators(qs)
        s = _seconds(max(reps, 20), attend_into_head_major, *acc, qs, ks, ks, lay_q, lay_k, True, d**-0.5)
        out["call_s"] = [[1, s]]
        for nbytes in sizes["copy_bytes"]:
            src, dst = torch.randn(nbytes // 4), torch.empty(nbytes // 4)
            s = _seconds(max(reps, 5), dst.copy_, src)
            out["copy"].append([nbytes, nbytes / s])
    return out


def _linears(x: torch.Tensor, h: torch.Tensor, weights: list[torch.Tensor]) -> None:
    for w in weights:  # the down projection reads the intermediate width
        torch.nn.functional.linear(x if w.shape[1] == x.shape[1] else h, w)


def _stub_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q


def _p2p(send: torch.Tensor, recv: torch.Tensor, nxt: int, prev: int) -> None:
    ops = [dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prev)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def _fit(points: list[tuple[int, float]]) -> dict[str, float]:
    """latency = the smallest message's time; bandwidth = the slope from it to the largest."""
    (b0, t0), (b1, t1) = points[0], points[-1]
    return {"latency_s": max(t0, 1e-7), "bandwidth": (b1 - b0) / max(t1 - t0, 1e-9)}


def _links(rank: int, world: int, sizes: dict[str, Any]) -> dict[str, dict[str, float]]:
    from seqpar.comm.shm import HostExchange

    reps = max(3, sizes["reps"] * 3)
    nxt, prev = (rank + 1) % world, (rank - 1) % world

    def timed(fn: Callable[..., Any], *args: Any) -> float:
        dist.barrier()
        return _seconds(reps, fn, *args)

    res: dict[str, list[tuple[int, float]]] = {k: [] for k in ("p2p", "all_to_all", "all_gather", "shm")}
    for nbytes in sizes["link_bytes"]:
        send, recv = torch.zeros(nbytes // 4), torch.empty(nbytes // 4)
        res["p2p"].append((nbytes, timed(_p2p, send, recv, nxt, prev)))
        flat = torch.zeros(world * nbytes // 4)
        res["all_to_all"].append(((world - 1) * nbytes, timed(dist.all_to_all_single, torch.empty_like(flat), flat)))
        parts = [torch.empty_like(send) for _ in range(world)]
        res["all_gather"].append(((world - 1) * nbytes, timed(dist.all_gather, parts, send)))
    exchange = HostExchange.create(None, max(sizes["shm_bytes"]))
    for nbytes in sizes["shm_bytes"]:
        t = torch.zeros(nbytes // 4)
        if exchange is None:  # no shared memory here: the process group stands in
            res["shm"].append((nbytes, timed(dist.all_gather, [torch.empty_like(t) for _ in range(world)], t)))
        else:
            res["shm"].append((nbytes, timed(exchange.all_gather, t)))
    links: dict[str, Any] = {name: _fit(points) for name, points in res.items()}
    links["overlap"] = _overlap(sizes, reps)
    return links


def _overlap(sizes: dict[str, Any], reps: int) -> float:
    """(A + B - C) / min(A, B): A an attention block alone, B a ring transfer alone, C the transfer
    posted before the block and waited on after it, as the ring runs them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    m, n = sizes["full_keys"], max(sizes["full_rows"])
    q, k, v = torch.randn(1, 3, 3 * n, 64), torch.randn(1, 3, m, 64), torch.randn(1, 3, m, 64)
    nbytes = max(sizes["link_bytes"])
    send, recv = torch.zeros(nbytes // 4), torch.empty(nbytes // 4)
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def both() -> None:
        ops = [dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prev)]
        reqs = dist.batch_isend_irecv(ops)
        sdpa(q, k, v, 0.0)
        for req in reqs:
            req.wait()

    dist.barrier()
    a = _seconds(reps, sdpa, q, k, v, 0.0)
    dist.barrier()
    b = _seconds(reps, _p2p, send, recv, nxt, prev)
    dist.barrier()
    c = _seconds(reps, both)
    return max(-1.0, min(1.0, (a + b - c) / min(a, b)))


def _rank(rank: int, world: int, mc: ModelConfig, sizes: dict[str, Any]) -> dict[str, Any]:
    dist.barrier()  # both ranks measure compute at once, as they run
    compute = measure_compute(mc, sizes)
    return {"compute": compute, "links": _links(rank, world, sizes)}


def tune(model: str = DEFAULT_MODEL, quick: bool = False) -> MachineProfile:
    from seqpar.comm.launch import run_ranks
    from seqpar.model import load_config

    mc = load_config(model)
    sizes = QUICK if quick else FULL
    ranks = run_ranks(_rank, 2, mc, sizes, threads=1, timeout=300)
    # each point: the mean of the two ranks' rates
    one = {
        k: [[x, (y0 + y1) / 2] for (x, y0), (_, y1) in zip(ranks[0]["compute"][k], ranks[1]["compute"][k])]
        for k in COMPUTE_KEYS
    }
    compute = {1: one}
    cores = os.cpu_count() or 1
    if cores > 1:
        before = torch.get_num_threads()
        torch.set_num_threads(cores)
        try:
            compute[cores] = measure_compute(mc, sizes)
        finally:
            torch.set_num_threads(before)
    measured = dict(ranks[0]["links"])
    overlap = (measured.pop("overlap") + ranks[1]["links"]["overlap"]) / 2
    links = {name: Link(**v) for name, v in measured.items()}
    source = (
        f"seqpar tune{' --quick' if quick else ''} --model {model} on {platform.node()} "
        f"({cores} cores, torch {torch.__version__}) at {time.strftime('%Y-%m-%d %H:%M')}"
    )
    rates = {t: Rates(**{k: tuple((x, y) for x, y in c[k]) for k in COMPUTE_KEYS}) for t, c in compute.items()}
    call_s = (ranks[0]["compute"]["call_s"][0][1] + ranks[1]["compute"]["call_s"][0][1]) / 2
    return MachineProfile(source, rates, links, overlap, call_s)


def describe(profile: MachineProfile) -> str:
    lines = [profile.source]
    for t, r in sorted(profile.compute.items()):
        for k in COMPUTE_KEYS:
            unit = "GB/s" if k == "copy" else "GFLOP/s"
            pts = ", ".join(f"{int(x)}: {y / 1e9:.1f}" for x, y in getattr(r, k))
            lines.append(f"  {t} thread(s) {k:<17} {unit:<8} {pts}")
    lines.append(f"  overlap of a ring transfer with attention: {profile.overlap:.2f}")
    lines.append(f"  one attention kernel call: {profile.call_s * 1e6:.1f} us")
    for name, link in profile.links.items():
        lines.append(
            f"  link {name:<11} latency {link.latency_s * 1e6:8.1f} us   bandwidth {link.bandwidth / 1e9:6.2f} GB/s"
        )
    return "\n".join(lines)


def add_tune_args(p: Any) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="whose layer shapes to measure (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (a smoke test; rough numbers)")
    p.add_argument("--output", default=None, metavar="PATH", help=f"where to write (default: {profile_path()})")


def run_tune(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    profile = tune(args.model, args.quick)
    path = profile.save(args.output)
    print(describe(profile))
    print(f"wrote the machine profile to {path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0
