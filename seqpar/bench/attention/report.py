"""The attention benchmark's tables: times and speedups, targets, the per-rank profile split."""

from __future__ import annotations

import statistics

from seqpar.bench.attention.rows import Result


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
            lines.append(
                f"| {r.label} | {shape} | {r.scheme or '-'} | error: `{res.error}` | - | - | - | - | - | - | - |"
            )
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


def paired_ratio(
    num: Result | None, den: Result | None, quiet: float | None = None
) -> tuple[float, list[float]] | None:
    """Median over rounds of num/den (each round's own times) and the per-round values.

    With `quiet`, only rounds in which both rows ran while other processes used at most that many cores.
    """
    if not num or not den or not num.round_medians or len(num.round_medians) != len(den.round_medians):
        return None
    per = [
        a / b
        for a, b, fa, fb in zip(num.round_medians, den.round_medians, num.round_foreign, den.round_foreign)
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
        (
            "zigzag ring vs PyTorch ring (allgather) on token-major inputs",
            by.get("torch_ring-allgather-token-major"),
            1.0,
        ),
    ]
    lines = []
    ulysses, ds = by.get("ulysses-contiguous") or by.get("ulysses-zigzag"), by.get("deepspeed")
    for text, other, target in checks:
        got = paired_ratio(other, ring)
        if got is None or ring is None or other is None:
            continue
        med, per = got
        quiet_got = paired_ratio(other, ring, quiet)
        quiet_txt = (
            "no quiet round"
            if quiet_got is None
            else (
                f"{quiet_got[0]:.2f}x over {len(quiet_got[1])} quiet rounds "
                f"({', '.join(f'{p:.2f}' for p in quiet_got[1])})"
            )
        )
        cpu = (other.cpu_median / ring.cpu_median) if other.cpu_median and ring.cpu_median else None
        lines.append(
            f"- {text} ({world} ranks), target >= {target:.2f}: all rounds {med:.2f}x "
            f"({', '.join(f'{p:.2f}' for p in per)}) -> {'met' if med >= target else 'MISSED'}; "
            f"{quiet_txt}; busiest-rank CPU {'-' if cpu is None else f'{cpu:.2f}x'}"
        )
    got = paired_ratio(ds, ulysses)
    if got is not None:
        lines.append(
            f"- seqpar ulysses ({ulysses.row.scheme}) vs DeepSpeed Ulysses (no target): {got[0]:.2f}x "
            f"({', '.join(f'{p:.2f}' for p in got[1])}); above 1 means seqpar is faster"
        )
    return "\n".join(lines)


def format_profile(results: list[Result]) -> str:
    """Per rank: wall and main-thread CPU per forward, and the wall time in kernel, merge and communication.

    The forward cell is "wall / main-thread CPU" in ms; the others are the wall time of the
    profiler's ranges, with their calls (medians over the timed forwards). "rest" is the
    forward's wall time outside them (layout, copies, and the baselines' own merges).
    """

    def cell(p: dict[str, float], key: str) -> str:
        return f"{_ms(p.get(key, 0.0))} ({p.get(key + '_calls', 0):.0f})"

    lines = [
        "| implementation | shards | rank | forward | process CPU | kernel (calls) | merge (calls) "
        "| ring post | ring wait | collectives | rest |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = ("kernel", "merge", "comm_post", "comm_wait", "collective")
    for res in results:
        for rank, p in enumerate(res.profile_by_rank()):
            rest = p["total"] - sum(p.get(k, 0.0) for k in keys)
            lines.append(
                f"| {res.row.label} | {res.row.scheme or '-'} | {rank} | {_ms(p['total'])} / {_ms(p['cpu'])} "
                f"| {_ms(p['proc_cpu'])} | {' | '.join(cell(p, k) for k in keys)} | {_ms(rest)} |"
            )
    return "\n".join(lines)
