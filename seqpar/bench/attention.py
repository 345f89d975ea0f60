"""Attention benchmark: every sequence-parallel strategy against one process, on one causal batch.

    python -m seqpar.bench.attention [--tokens 16384] [--world 2] [--repeats 3] [--json out.json]

Every row does the same work: exact causal attention of one sequence (or a ragged
batch, `--seq-lens`) in fp32, q [T, Hq, D], k/v [T, Hkv, D]. Rows:
- single process: `attention_with_lse` over the whole batch with 1 and with 2 threads;
- every seqpar strategy on `--world` gloo ranks x 1 thread (zigzag shards; also
  contiguous ones for ring, to show the causal imbalance, and for ulysses, to match
  DeepSpeed), each rank timing `sp_attention` on its shard between barriers; a row's
  time is the slowest rank's;
- baselines (`seqpar.bench.baselines`): PyTorch's ring attention and DeepSpeed Ulysses.

Each configuration lives in its own spawned processes (1 process for the single-process
rows, `--world` for the distributed ones; DeepSpeed apart), so thread settings are
clean. The processes stay up and the driver interleaves single forwards: a warm-up
round that also checks every output against the single-process result (max abs
error), then `--repeats` timed rounds, the row order rotating each round, so drift on
a shared machine hits every row alike. Reported: median and best time per forward,
speedups against the 1-thread single process, the same over "quiet" forwards (other
processes used <= `--quiet-load` cores meanwhile, read from /proc/stat) and the
slowest rank's main-thread CPU time (what the forward costs with a core to itself).
`--profile` splits each row's time per rank into kernel, LSE merge and communication.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import queue as queue_mod
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp

from seqpar.bench.baselines import (
    Prepared,
    install_torch_ring_profiler,
    prepare_deepspeed_ulysses,
    prepare_torch_ring,
    profiled_torch_ring_op,
)
from seqpar.comm.launch import free_port
from seqpar.kernels.attention import attention_with_lse
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.api import STRATEGIES, sp_attention

ERROR_TOL = 1e-4  # fp32: seqpar rows must match the single process to this (max abs)
BASELINES = ("torch_ring", "deepspeed")
QUICK = dict(tokens=1024, heads=4, kv_heads=2, head_dim=32, repeats=1)


@dataclass(frozen=True)
class Row:
    """One line of the table: what runs, on how many ranks and threads."""

    key: str
    label: str
    kind: str  # single | seqpar | torch_ring | deepspeed
    world: int
    threads: int
    scheme: str = ""
    strategy: str = ""
    ulysses_degree: int | None = None
    rotate: str = ""
    layout: str = ""


@dataclass
class Result:
    row: Row
    samples: list[float] = field(default_factory=list)  # seconds per forward (max over ranks)
    round_medians: list[float] = field(default_factory=list)
    cpu_samples: list[float] = field(default_factory=list)  # main-thread CPU seconds of the busiest rank
    foreign: list[float] = field(default_factory=list)  # per sample: cores other processes used meanwhile
    round_foreign: list[float] = field(default_factory=list)  # per round: the most of its samples
    err: float | None = None
    error: str | None = None
    profile: list[list[dict[str, float]]] = field(default_factory=list)  # per timed forward, per rank: seconds

    def profile_by_rank(self) -> list[dict[str, float]]:
        """Per rank, the median over timed forwards of each profiled quantity."""
        if not self.profile:
            return []
        out = []
        for rank in range(len(self.profile[0])):
            keys = set().union(*(fwd[rank].keys() for fwd in self.profile))
            out.append({k: statistics.median(fwd[rank].get(k, 0.0) for fwd in self.profile) for k in keys})
        return out

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def quiet_samples(self, threshold: float) -> list[float]:
        return [t for t, f in zip(self.samples, self.foreign) if f <= threshold]

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_samples) if self.cpu_samples else None


# ---------------------------------------------------------------- rows

def build_rows(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    w = args.world
    rows = [
        Row("single1", "single process, attention_with_lse", "single", 1, 1),
        Row("single2", "single process, attention_with_lse", "single", 1, 2),
    ]
    notes: list[str] = []
    baselines = BASELINES if args.baselines == "all" else tuple(b for b in args.baselines.split(",") if b and b != "none")
    for b in baselines:
        if b not in BASELINES:
            raise SystemExit(f"unknown baseline {b!r}; choose from {', '.join(BASELINES)}, all or none")
    explicit_schemes = args.schemes is not None
    schemes = args.schemes.split(",") if explicit_schemes else ["zigzag"]
    for strategy in args.strategies.split(","):
        if strategy not in STRATEGIES:
            raise SystemExit(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        strat_schemes = list(schemes)
        if strategy == "ring" and not explicit_schemes:
            strat_schemes.append("contiguous")  # to show the causal imbalance zigzag removes
        if strategy == "ulysses" and not explicit_schemes and "deepspeed" in baselines:
            strat_schemes.append("contiguous")  # like for like with DeepSpeed Ulysses, which takes contiguous shards
        degrees: list[int | None] = [None]
        if strategy == "usp":
            degrees = []
            for u in dict.fromkeys((1, w)):
                if w % u == 0 and args.heads % u == 0:
                    degrees.append(u)
                else:
                    notes.append(f"usp with ulysses_degree={u} skipped: needs {u} to divide world {w} and heads {args.heads}")
        for scheme in strat_schemes:
            for u in degrees:
                name = strategy if u is None else f"{strategy} (ulysses_degree={u})"
                key = f"{strategy}-{scheme}" + ("" if u is None else f"-u{u}")
                rows.append(Row(key, f"seqpar {name}", "seqpar", w, 1, scheme, strategy, u))
    if "torch_ring" in baselines:
        rows.append(Row("torch_ring-allgather", "PyTorch ring (_templated_ring_attention, rotate=allgather)",
                        "torch_ring", w, 1, "zigzag", rotate="allgather"))
        rows.append(Row("torch_ring-alltoall", "PyTorch ring (_templated_ring_attention, rotate=alltoall)",
                        "torch_ring", w, 1, "zigzag", rotate="alltoall"))
        # The same, fed views of token-major memory (what seqpar's strategies get): isolates the layout effect.
        rows.append(Row("torch_ring-allgather-token-major",
                        "PyTorch ring (rotate=allgather), q/k/v as views of token-major [T, H, D] memory",
                        "torch_ring", w, 1, "zigzag", rotate="allgather", layout="token-major"))
    if "deepspeed" in baselines:
        rows.append(Row("deepspeed", "DeepSpeed Ulysses (DistributedAttention)", "deepspeed", w, 1, "contiguous"))
    return rows, notes


def launch_groups(rows: list[Row]) -> list[tuple[str, int, int, list[Row]]]:
    """Rows that can share spawned processes: same world and threads (DeepSpeed alone: its import patches state)."""
    groups: dict[tuple[str, int, int], list[Row]] = {}
    for r in rows:
        tag = r.kind if r.kind in ("single", "deepspeed") else "sp"
        groups.setdefault((f"{tag}{r.threads}", r.world, r.threads), []).append(r)
    return [(name, world, threads, rs) for (name, world, threads), rs in groups.items()]


# ---------------------------------------------------------------- inside the ranks

_PROF: Counter = Counter()


def _timed(fn: Any, key: str) -> Any:
    """fn, accumulating its wall time, its calling thread's CPU time and its calls into _PROF."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        c0, t0 = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _PROF[key] += time.perf_counter() - t0
            _PROF[key + "_cpu"] += time.thread_time() - c0
            _PROF[key + "_calls"] += 1
    return wrapper


def _install_seqpar_profiler() -> None:
    """Wrap (in this process only) the kernel, merge and communication entry points seqpar calls."""
    import torch.distributed as dist

    import seqpar.bench.baselines as baselines
    import seqpar.kernels.attention as kern
    import seqpar.strategies.pass_q as pass_q
    from seqpar.comm.ring import RingExchanger

    if getattr(kern, "_seqpar_bench_profiled", False):
        return
    targets = [
        (kern, "_fused_lse", "kernel"),  # every dense block seqpar's kernels compute
        (kern, "merge_into", "merge"),
        (pass_q, "merge_many", "merge"),
        (RingExchanger, "send_recv", "comm_post"),
        (RingExchanger, "wait", "comm_wait"),
        (dist, "all_to_all_single", "collective"),
        (dist, "all_gather", "collective"),
        (baselines, "cpu_flash", "kernel"),  # DeepSpeed's local attention
    ]
    for owner, name, key in targets:
        if hasattr(owner, name):  # an entry point renamed inside seqpar goes unprofiled, not broken
            setattr(owner, name, _timed(getattr(owner, name), key))
    kern._seqpar_bench_profiled = True


def _prepare(row: Row, rank: int, world: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             seq_lens: tuple[int, ...], profile: bool) -> Prepared:
    if row.kind == "single":
        plan = ShardPlan(seq_lens=seq_lens, world_size=1)
        lay = plan.global_layout
        return Prepared(lambda: attention_with_lse(q, k, v, lay, lay, True)[0], torch.arange(q.shape[0]), lambda o: o)
    if row.kind == "seqpar":
        plan = ShardPlan(seq_lens=seq_lens, world_size=world, scheme=row.scheme)
        idx = plan.local_indices(rank)
        ql, kl, vl = q[idx].contiguous(), k[idx].contiguous(), v[idx].contiguous()

        def forward() -> torch.Tensor:
            return sp_attention(ql, kl, vl, plan=plan, group=None, strategy=row.strategy, causal=True,
                                ulysses_degree=row.ulysses_degree)
        return Prepared(forward, idx, lambda o: o)
    if row.kind == "torch_ring":
        if profile:
            install_torch_ring_profiler(_PROF)
        op = profiled_torch_ring_op(_PROF) if profile else None
        return prepare_torch_ring(rank, world, q, k, v, seq_lens, rotate=row.rotate, op=op,
                                  layout=row.layout or "head-major")
    if row.kind == "deepspeed":
        return prepare_deepspeed_ulysses(rank, world, q, k, v, seq_lens)
    raise ValueError(f"unknown row kind {row.kind!r}")


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _run_row(row: Row, prep: Prepared, ref: torch.Tensor, world: int, check: bool, profile: bool) -> dict[str, Any]:
    """One forward of one row on this rank, between barriers: its wall and CPU time, and its error when `check`."""
    import torch.distributed as dist

    if world > 1:
        dist.barrier()
    _PROF.clear()
    cpu0, proc0 = time.thread_time(), time.process_time()
    t0 = time.perf_counter()
    out = prep.forward()
    wall = time.perf_counter() - t0
    cpu, proc = time.thread_time() - cpu0, time.process_time() - proc0
    res: dict[str, Any] = {"time": wall, "cpu": cpu, "proc_cpu": proc, "err": None, "profile": {}}
    if profile:
        res["profile"] = {**_PROF, "total": wall, "cpu": cpu, "proc_cpu": proc}
    if check:
        got = prep.to_rows(out).float()
        want = ref[prep.rows]
        if got.shape != want.shape:
            raise RuntimeError(f"output rows {tuple(got.shape)} != expected {tuple(want.shape)}")
        res["err"] = float((got - want).abs().max()) if got.numel() else 0.0
    return res


def _worker(rank: int, world: int, port: int, threads: int, data_path: str, rows: list[Row], profile: bool,
            commands: Any, results: Any) -> None:
    """A long-lived rank: prepares its rows once, then runs the row named by each command until told to stop.

    Keeping ranks alive lets the driver interleave single forwards of every configuration
    while each process keeps its own thread setting.
    """
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        data = torch.load(data_path)
        q, k, v, ref, seq_lens = data["q"], data["k"], data["v"], data["ref"], tuple(data["seq_lens"])
        if profile:
            _install_seqpar_profiler()
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
                        preps[key] = _prepare(by_key[key], rank, world, q, k, v, seq_lens, profile)
                    res = _run_row(by_key[key], preps[key], ref, world, check, profile)
                except Exception as exc:  # the row reports the exact error instead of a number
                    res = {"error": _error_text(exc)}
                results.put((rank, key, res))
    except BaseException:
        results.put((rank, "fatal", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Group:
    """`world` worker processes sharing one thread setting, driven by per-rank command queues."""

    def __init__(self, ctx: Any, name: str, world: int, threads: int, rows: list[Row], data_path: str,
                 profile: bool, timeout: float):
        self.name, self.world, self.rows, self.timeout = name, world, rows, timeout
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, threads, data_path, rows, profile, self.commands[r], self.results),
                        daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.alive = True

    def _collect(self, what: str, timeout: float) -> list[Any]:
        got: dict[int, Any] = {}
        while len(got) < self.world:
            try:
                rank, key, value = self.results.get(timeout=timeout)
            except queue_mod.Empty:
                raise RuntimeError(f"{self.name}: no answer to {what} within {timeout:g}s (a hang?)") from None
            if key == "fatal":
                raise RuntimeError(f"{self.name}: rank {rank} died: {value.strip().splitlines()[-1]}")
            got[rank] = value
        return [got[r] for r in range(self.world)]

    def wait_ready(self) -> None:
        self._collect("start-up", max(self.timeout, 300.0))  # imports and process-group set-up

    def run(self, key: str, check: bool) -> list[dict[str, Any]]:
        for c in self.commands:
            c.put((key, check))
        return self._collect(key, self.timeout)

    def close(self, kill: bool = False) -> None:
        if self.alive and not kill:
            for c in self.commands:
                c.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        self.alive = False


# ---------------------------------------------------------------- driver

def make_inputs(seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    t = sum(seq_lens)
    q = torch.randn(t, heads, head_dim, generator=gen)
    k = torch.randn(t, kv_heads, head_dim, generator=gen)
    v = torch.randn(t, kv_heads, head_dim, generator=gen)
    lay = ShardPlan(seq_lens=seq_lens, world_size=1).global_layout
    ref, _ = attention_with_lse(q, k, v, lay, lay, True)  # the single-process output every row is checked against
    return {"q": q, "k": k, "v": v, "ref": ref, "seq_lens": list(seq_lens)}


def run_benchmark(args: argparse.Namespace, rows: list[Row], log: Any = sys.stderr) -> list[Result]:
    """Start every launch group, then interleave: one warm-up/check round, then `repeats` timed rounds.

    In each timed round every row runs `iters` forwards, rows in an order that rotates by one
    every round, so each row's neighbours in time change and slow phases of a noisy machine
    are shared out.
    """
    results = {r.key: Result(r) for r in rows}
    ctx = mp.get_context("spawn")
    groups: dict[str, _Group] = {}
    owner: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="seqpar-bench-") as tmp:
        data_path = os.path.join(tmp, "inputs.pt")
        t0 = time.perf_counter()
        torch.save(make_inputs(args.seq_lens, args.heads, args.kv_heads, args.head_dim, args.seed), data_path)
        print(f"inputs and reference ready in {time.perf_counter() - t0:.1f}s", file=log)
        try:
            for name, world, threads, grows in launch_groups(rows):
                groups[name] = _Group(ctx, name, world, threads, grows, data_path, args.profile, args.timeout)
                owner.update({r.key: name for r in grows})
            for name, g in list(groups.items()):
                try:
                    g.wait_ready()
                except Exception as exc:
                    _fail_group(g, results, _error_text(exc))
            for rnd in range(args.repeats + 1):  # round 0: warm-up and exactness check, not timed
                order = rows if rnd == 0 else rows[(rnd - 1) % len(rows):] + rows[: (rnd - 1) % len(rows)]
                t1 = time.perf_counter()
                for row in order:
                    res, g = results[row.key], groups[owner[row.key]]
                    if res.error is not None or not g.alive:
                        continue
                    times, foreign = [], []
                    for _ in range(1 if rnd == 0 else args.iters):
                        busy0, own0, wall0 = _busy_seconds(), time.process_time(), time.perf_counter()
                        try:
                            parts = g.run(row.key, check=rnd == 0)
                        except Exception as exc:  # a hang or a dead rank: restart the group without this row
                            res.error = _error_text(exc)
                            print(f"{row.label} [{row.scheme}]: {res.error}; restarting {g.name}", file=log)
                            g.close(kill=True)
                            rest = [r for r in g.rows if results[r.key].error is None]
                            if rest:
                                groups[g.name] = _Group(ctx, g.name, g.world, threads_of(rest), rest, data_path,
                                                        args.profile, args.timeout)
                                groups[g.name].wait_ready()
                            break
                        errors = [p["error"] for p in parts if "error" in p]
                        if errors:
                            res.error = errors[0]
                            break
                        if rnd == 0:
                            res.err = max(p["err"] for p in parts)
                        else:
                            times.append(max(p["time"] for p in parts))
                            res.cpu_samples.append(max(p["cpu"] for p in parts))
                            busy1 = _busy_seconds()
                            if busy0 is not None and busy1 is not None:
                                ours = sum(p["proc_cpu"] for p in parts) + time.process_time() - own0
                                foreign.append(max(0.0, busy1 - busy0 - ours) / (time.perf_counter() - wall0))
                            else:
                                foreign.append(0.0)
                            if args.profile:
                                res.profile.append([p["profile"] for p in parts])
                    if times and res.error is None:
                        res.samples += times
                        res.foreign += foreign
                        res.round_foreign.append(max(foreign))
                        res.round_medians.append(statistics.median(times))
                what = "warm-up and check" if rnd == 0 else f"round {rnd}/{args.repeats}"
                print(f"{what}: {time.perf_counter() - t1:.1f}s", file=log)
        finally:
            for g in groups.values():
                g.close(kill=not g.alive)
    return [results[r.key] for r in rows]


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all processes, all cores), from /proc/stat; None elsewhere.

    Busy = user + nice + system + irq + softirq + steal. Subtracting what the ranks themselves
    used during a forward gives the load of other processes at that time: the noise.
    """
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(vals) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = vals
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def threads_of(rows: list[Row]) -> int:
    return rows[0].threads


def _fail_group(g: _Group, results: dict[str, Result], text: str) -> None:
    for r in g.rows:
        results[r.key].error = results[r.key].error or text
    g.close(kill=True)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:,.1f}"


def _x(base: float | None, value: float | None) -> str:
    return f"{base / value:.2f}x" if base and value else "-"


def format_table(results: list[Result], quiet: float) -> str:
    """Wall times and speedups against the 1-thread single process, three ways.

    - median of all timed forwards, and the best one;
    - "quiet": median of the forwards during which other processes used at most `quiet`
      cores (from /proc/stat, minus the ranks' own CPU time), with their count;
    - "busiest rank CPU": the main-thread CPU time of the slowest rank (median), what the
      forward would take with a core to itself and nothing to wait for.
    On a shared machine the last two separate an implementation's cost from the time
    other processes took.
    """
    single = results[0] if results and results[0].row.key == "single1" else None
    base = single.median if single else None
    base_q = statistics.median(single.quiet_samples(quiet)) if single and single.quiet_samples(quiet) else None
    base_cpu = single.cpu_median if single else None
    lines = [
        "| implementation | ranks x threads | shards | time / forward (ms, median) | best (ms) | speedup (median) "
        "| quiet median (ms, n) | speedup (quiet) | busiest rank CPU (ms) | CPU speedup | max abs error |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        r = res.row
        shape = f"{r.world} x {r.threads}"
        if res.error and res.median is None:
            lines.append(f"| {r.label} | {shape} | {r.scheme or '-'} | error: `{res.error}` | - | - | - | - | - | - | - |")
            continue
        med, best = res.median, (min(res.samples) if res.samples else None)
        qs = res.quiet_samples(quiet)
        qmed = statistics.median(qs) if qs else None
        err = "-" if res.err is None else f"{res.err:.1e}"
        lines.append(
            f"| {r.label} | {shape} | {r.scheme or '-'} | {_ms(med)} | {_ms(best)} | {_x(base, med)} "
            f"| {_ms(qmed)} ({len(qs)}/{len(res.samples)}) | {_x(base_q, qmed)} "
            f"| {_ms(res.cpu_median)} | {_x(base_cpu, res.cpu_median)} | {err} |"
        )
    return "\n".join(lines)


def paired_ratio(num: Result | None, den: Result | None, quiet: float | None = None) -> tuple[float, list[float]] | None:
    """Median over rounds of num/den (each round's own times) and the per-round values.

    With `quiet`, only rounds in which both rows ran while other processes used at most that many cores.
    """
    if not num or not den or not num.round_medians or len(num.round_medians) != len(den.round_medians):
        return None
    per = [
        a / b for a, b, fa, fb in zip(num.round_medians, den.round_medians, num.round_foreign, den.round_foreign)
        if quiet is None or max(fa, fb) <= quiet
    ]
    return (statistics.median(per), per) if per else None


def format_targets(results: list[Result], world: int, quiet: float) -> str:
    by = {r.row.key: r for r in results}
    ring = by.get("ring-zigzag")
    checks = [
        ("zigzag ring vs single process 1 thread", by.get("single1"), 1.85),
        ("zigzag ring vs single process 2 threads", by.get("single2"), 1.0),
        ("zigzag ring vs PyTorch ring (allgather)", by.get("torch_ring-allgather"), 1.0),
        ("zigzag ring vs PyTorch ring (alltoall)", by.get("torch_ring-alltoall"), 1.0),
        ("zigzag ring vs PyTorch ring (allgather) on token-major inputs", by.get("torch_ring-allgather-token-major"), 1.0),
    ]
    lines = []
    ulysses, ds = by.get("ulysses-contiguous") or by.get("ulysses-zigzag"), by.get("deepspeed")
    for text, other, target in checks:
        got = paired_ratio(other, ring)
        if got is None or ring is None or other is None:
            continue
        med, per = got
        quiet_got = paired_ratio(other, ring, quiet)
        quiet_txt = "no quiet round" if quiet_got is None else (
            f"{quiet_got[0]:.2f}x over {len(quiet_got[1])} quiet rounds ({', '.join(f'{p:.2f}' for p in quiet_got[1])})")
        cpu = (other.cpu_median / ring.cpu_median) if other.cpu_median and ring.cpu_median else None
        lines.append(
            f"- {text} ({world} ranks), target >= {target:.2f}: all rounds {med:.2f}x "
            f"({', '.join(f'{p:.2f}' for p in per)}) -> {'met' if med >= target else 'MISSED'}; "
            f"{quiet_txt}; busiest-rank CPU {'-' if cpu is None else f'{cpu:.2f}x'}"
        )
    got = paired_ratio(ds, ulysses)
    if got is not None:
        lines.append(f"- seqpar ulysses ({ulysses.row.scheme}) vs DeepSpeed Ulysses (no target): {got[0]:.2f}x "
                     f"({', '.join(f'{p:.2f}' for p in got[1])}); above 1 means seqpar is faster")
    return "\n".join(lines)


def format_profile(results: list[Result]) -> str:
    """Per rank: wall and main-thread CPU per forward, and the share of kernel, merge and communication.

    Each cell is "wall / main-thread CPU" in ms (medians over the timed forwards); a wall
    time well above its CPU time means the thread waited or was descheduled.
    """
    def cell(p: dict[str, float], key: str, calls: bool = False) -> str:
        text = f"{_ms(p.get(key, 0.0))} / {_ms(p.get(key + '_cpu', 0.0))}"
        return text + (f" ({p.get(key + '_calls', 0):.0f})" if calls else "")

    lines = [
        "| implementation | shards | rank | forward | process CPU | kernel (calls) | merge (calls) "
        "| ring post | ring wait | collectives | rest |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for rank, p in enumerate(res.profile_by_rank()):
            keys = ("kernel", "merge", "comm_post", "comm_wait", "collective")
            rest_wall = p["total"] - sum(p.get(k, 0.0) for k in keys)
            rest_cpu = p["cpu"] - sum(p.get(k + "_cpu", 0.0) for k in keys)
            lines.append(
                f"| {res.row.label} | {res.row.scheme or '-'} | {rank} | {_ms(p['total'])} / {_ms(p['cpu'])} "
                f"| {_ms(p['proc_cpu'])} | {cell(p, 'kernel', True)} | {cell(p, 'merge', True)} | {cell(p, 'comm_post')} "
                f"| {cell(p, 'comm_wait')} | {cell(p, 'collective')} | {_ms(rest_wall)} / {_ms(rest_cpu)} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seqpar bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="length of the one causal sequence (default 16384)")
    p.add_argument("--seq-lens", type=str, default=None,
                   help="comma-separated lengths of a ragged batch (instead of --tokens)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    p.add_argument("--world", type=int, default=2, help="ranks of the distributed rows (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; times are medians over them (default 3)")
    p.add_argument("--iters", type=int, default=1, help="timed forwards per row per round (default 1); one warm-up round comes first")
    p.add_argument("--schemes", type=str, default=None,
                   help="comma-separated shard schemes for every strategy (default: zigzag; plus contiguous for ring, "
                        "and for ulysses when DeepSpeed runs)")
    p.add_argument("--strategies", type=str, default=",".join(STRATEGIES),
                   help=f"comma-separated seqpar strategies (default {','.join(STRATEGIES)})")
    p.add_argument("--baselines", type=str, default="all",
                   help=f"comma-separated baselines from {','.join(BASELINES)}, or all, or none (default all)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes for a smoke test (1024 tokens, 4 heads, 2 kv heads, dim 32, 1 round)")
    p.add_argument("--profile", action="store_true",
                   help="also split each row's time into kernel / merge / communication, per rank")
    p.add_argument("--quiet-load", type=float, default=0.15, metavar="CORES",
                   help="a forward counts as quiet when other processes used at most this many cores meanwhile (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random q, k, v (default 0)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one forward may take before its ranks count as hung (default 1800)")
    p.add_argument("--json", type=str, default=None, metavar="PATH", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")] if args.seq_lens else [args.tokens]
    if any(n < 1 for n in args.seq_lens):
        p.error(f"sequence lengths must be positive, got {args.seq_lens}")
    for name in ("heads", "kv_heads", "head_dim", "world", "repeats", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, notes = build_rows(args)
    shape = (f"{len(args.seq_lens)} sequences {args.seq_lens}" if len(args.seq_lens) > 1 else f"1 sequence of {args.seq_lens[0]} tokens")
    header = (f"causal attention, fp32, {shape}, {args.heads} q heads / {args.kv_heads} kv heads, head dim {args.head_dim}; "
              f"{args.repeats} rounds x {args.iters} timed forwards; torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, {platform.machine()}")
    print(header, file=sys.stderr)
    results = run_benchmark(args, rows)
    print(f"\n{header}\n")
    print(format_table(results, args.quiet_load))
    targets = format_targets(results, args.world, args.quiet_load)
    if targets:
        print("\n" + targets)
    for n in notes:
        print(f"- {n}")
    if args.profile:
        print("\nper-rank time split, wall / main-thread CPU in ms per forward (medians over the timed forwards):\n")
        print(format_profile(results))
    if args.json:
        base = results[0].median if results and results[0].row.key == "single1" else None
        payload = {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
            "rows": [
                {**asdict(res.row), "samples_s": res.samples, "round_medians_s": res.round_medians,
                 "median_s": res.median, "speedup_vs_single_1_thread": (base / res.median) if base and res.median else None,
                 "busiest_rank_cpu_samples_s": res.cpu_samples, "foreign_load_cores": res.foreign,
                 "quiet_median_s": statistics.median(res.quiet_samples(args.quiet_load)) if res.quiet_samples(args.quiet_load) else None,
                 "max_abs_error": res.err, "error": res.error, "profile": res.profile_by_rank()}
                for res in results
            ],
            "notes": notes,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    bad = [res for res in results if res.row.kind in ("single", "seqpar")
           and (res.error or res.err is None or res.err > ERROR_TOL or res.median is None)]
    for res in bad:
        print(f"FAILED: {res.row.label} [{res.row.scheme}]: {res.error or f'max abs error {res.err}'}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    # Re-import by module name so spawned ranks unpickle functions from seqpar.bench.attention, not __main__.
    from seqpar.bench.attention import main as _main

    sys.exit(_main())
