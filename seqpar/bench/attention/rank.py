"""Inside one rank of the attention benchmark: prepare each row once, run one forward per command.

With `profile`, each forward runs under torch.profiler and its time is split by the ranges
seqpar marks (`seqpar.profiling`) and, for the baselines, by their ops (the CPU flash kernel,
the functional collectives, c10d's); their LSE merges have no range of their own and fall in
"rest".
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity

from seqpar import profiling
from seqpar.bench.attention.rows import Row
from seqpar.bench.baselines import Prepared, prepare_deepspeed_ulysses, prepare_torch_ring
from seqpar.comm.launch import init_local_rank
from seqpar.kernels.attention import attention_with_lse
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.api import sp_attention

# profiler range or op -> column of the profile table
SEQPAR_RANGES = {
    profiling.KERNEL: "kernel",
    profiling.MERGE: "merge",
    profiling.RING_POST: "comm_post",
    profiling.RING_WAIT: "comm_wait",
    profiling.COLLECTIVE: "collective",
}
BASELINE_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "kernel",
    "_c10d_functional::all_gather_into_tensor": "comm_post",  # PyTorch ring's rotation, posted
    "_c10d_functional::all_to_all_single": "comm_post",
    "_c10d_functional::wait_tensor": "comm_wait",
    "c10d::alltoall_base_": "collective",  # DeepSpeed Ulysses' all-to-alls
}


def profile_split(prof: Any, kind: str) -> dict[str, float]:
    """Seconds and calls per column from one profiled forward (ranges of one name never nest)."""
    names = SEQPAR_RANGES if kind in ("single", "seqpar") else BASELINE_OPS
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        col = names.get(ev.key)
        if col is not None:
            out[col] = out.get(col, 0.0) + ev.cpu_time_total / 1e6
            out[col + "_calls"] = out.get(col + "_calls", 0) + ev.count
    return out


def _prepare(
    row: Row, rank: int, world: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: tuple[int, ...]
) -> Prepared:
    if row.kind == "single":
        plan = ShardPlan(seq_lens=seq_lens, world_size=1)
        lay = plan.global_layout
        return Prepared(lambda: attention_with_lse(q, k, v, lay, lay, True)[0], torch.arange(q.shape[0]), lambda o: o)
    if row.kind == "seqpar":
        plan = ShardPlan(seq_lens=seq_lens, world_size=world, scheme=row.scheme)
        idx = plan.local_indices(rank)
        ql, kl, vl = q[idx].contiguous(), k[idx].contiguous(), v[idx].contiguous()

        def forward() -> torch.Tensor:
            return sp_attention(
                ql, kl, vl, plan=plan, group=None, strategy=row.strategy, causal=True, ulysses_degree=row.ulysses_degree
            )

        return Prepared(forward, idx, lambda o: o)
    if row.kind == "torch_ring":
        return prepare_torch_ring(rank, world, q, k, v, seq_lens, rotate=row.rotate, layout=row.layout or "head-major")
    if row.kind == "deepspeed":
        return prepare_deepspeed_ulysses(rank, world, q, k, v, seq_lens)
    raise ValueError(f"unknown row kind {row.kind!r}")


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _run_row(row: Row, prep: Prepared, ref: torch.Tensor, world: int, check: bool, profile: bool) -> dict[str, Any]:
    """One forward of one row on this rank, between barriers: its wall and CPU time, and its error when `check`."""
    if world > 1:
        dist.barrier()
    prof = torch.profiler.profile(activities=[ProfilerActivity.CPU]) if profile else None
    if prof is not None:
        prof.start()
    cpu0, proc0 = time.thread_time(), time.process_time()
    t0 = time.perf_counter()
    out = prep.forward()
    wall = time.perf_counter() - t0
    cpu, proc = time.thread_time() - cpu0, time.process_time() - proc0
    res: dict[str, Any] = {"time": wall, "cpu": cpu, "proc_cpu": proc, "err": None, "profile": {}}
    if prof is not None:
        prof.stop()
        res["profile"] = {**profile_split(prof, row.kind), "total": wall, "cpu": cpu, "proc_cpu": proc}
    if check:
        got = prep.to_rows(out).float()
        want = ref[prep.rows]
        if got.shape != want.shape:
            raise RuntimeError(f"output rows {tuple(got.shape)} != expected {tuple(want.shape)}")
        res["err"] = float((got - want).abs().max()) if got.numel() else 0.0
    return res


def worker(
    rank: int,
    world: int,
    port: int,
    threads: int,
    data_path: str,
    rows: list[Row],
    profile: bool,
    commands: Any,
    results: Any,
) -> None:
    """A long-lived rank: prepares its rows once, then runs the row named by each command until told to stop.

    Keeping ranks alive lets the driver interleave single forwards of every configuration
    while each process keeps its own thread setting.
    """
    try:
        init_local_rank(rank, world, port, threads)
        data = torch.load(data_path)
        q, k, v, ref, seq_lens = data["q"], data["k"], data["v"], data["ref"], tuple(data["seq_lens"])
        by_key = {r.key: r for r in rows}
        preps: dict[str, Prepared] = {}
        results.put((rank, "ready", None))
        with torch.no_grad():
            while True:
                cmd = commands.get()
                if cmd is None:
                    break
                key, check = cmd
                try:
                    if key not in preps:
                        preps[key] = _prepare(by_key[key], rank, world, q, k, v, seq_lens)
                    res = _run_row(by_key[key], preps[key], ref, world, check, profile)
                except Exception as exc:  # the row reports the exact error instead of a number
                    res = {"error": error_text(exc)}
                results.put((rank, key, res))
    except BaseException:
        results.put((rank, "fatal", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
