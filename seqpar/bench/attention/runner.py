"""The attention benchmark's driver: launch groups of ranks, interleave rounds, collect results."""

from __future__ import annotations

import argparse
import os
import queue as queue_mod
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from seqpar.bench.attention.rank import error_text, worker
from seqpar.bench.attention.rows import Result, Row, launch_groups
from seqpar.comm.launch import start_ranks, stop_ranks
from seqpar.kernels.attention import attention_with_lse
from seqpar.sharding.plan import ShardPlan


class _Group:
    """`world` worker processes sharing one thread setting, driven by per-rank command queues."""

    def __init__(
        self, name: str, world: int, threads: int, rows: list[Row], data_path: str, profile: bool, timeout: float
    ):
        self.name, self.world, self.rows, self.timeout = name, world, rows, timeout
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        self.procs = start_ranks(
            worker,
            world,
            lambda r: (threads, data_path, rows, profile, self.commands[r], self.results),
            name=f"bench-{name}-rank",
        )
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
        stop_ranks(self.procs, grace_s=0 if kill else 30)
        self.alive = False


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
    groups: dict[str, _Group] = {}
    owner: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="seqpar-bench-") as tmp:
        data_path = os.path.join(tmp, "inputs.pt")
        t0 = time.perf_counter()
        torch.save(make_inputs(args.seq_lens, args.heads, args.kv_heads, args.head_dim, args.seed), data_path)
        print(f"inputs and reference ready in {time.perf_counter() - t0:.1f}s", file=log)
        try:
            for name, world, threads, grows in launch_groups(rows):
                groups[name] = _Group(name, world, threads, grows, data_path, args.profile, args.timeout)
                owner.update({r.key: name for r in grows})
            for g in list(groups.values()):
                try:
                    g.wait_ready()
                except Exception as exc:
                    _fail_group(g, results, error_text(exc))
            for rnd in range(args.repeats + 1):  # round 0: warm-up and exactness check, not timed
                order = rows if rnd == 0 else rows[(rnd - 1) % len(rows) :] + rows[: (rnd - 1) % len(rows)]
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
                            res.error = error_text(exc)
                            print(f"{row.label} [{row.scheme}]: {res.error}; restarting {g.name}", file=log)
                            g.close(kill=True)
                            rest = [r for r in g.rows if results[r.key].error is None]
                            if rest:
                                groups[g.name] = _Group(
                                    g.name, g.world, threads_of(rest), rest, data_path, args.profile, args.timeout
                                )
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
