"""What the serving benchmark reports: its targets, the load results as a markdown table and a
plot, and the results file (written after every level)."""

from __future__ import annotations

from typing import Any

from seqpar.bench.report import markdown_table, write_json


def targets(results: dict[str, Any]) -> dict[str, Any]:
    load, out = results["load"], {}
    try:
        r = load["sp2"]["1"]["ttft_s"]["p50"] / load["sp1"]["1"]["ttft_s"]["p50"]
        out["sp2_ttft_p50_vs_sp1_c1"] = {"ratio": r, "target": 0.55, "met": r <= 0.55}
    except KeyError:
        pass
    top = str(max((int(c) for per in load.values() for c in per), default=0))
    for name, per in load.items():
        if name.startswith("sp") and top in per:
            errors = per[top].get("errors")  # None: the level did not run to the end
            out[f"{name}_errors_c{top}"] = {"errors": errors, "target": 0, "met": errors == 0}
    if results.get("ttft_pairs"):
        out["sp2_ttft_vs_sp1_paired"] = {k: results["ttft_pairs"][k] for k in ("ratio", "target", "met")}
    if results.get("one_token"):
        out["one_token_http_vs_generate"] = {k: results["one_token"][k] for k in ("ratio", "target", "met")}
    return out


def table(results: dict[str, Any]) -> str:
    """The load results as a markdown table."""
    head = ["server", "concurrency", "ok", "errors", "TTFT p50 / p99 (s)", "ITL p50 / p99 (ms)"]
    head += ["E2E p50 / p99 (s)", "output tok/s", "prompt tok"]
    rows = []
    for name, per in results["load"].items():
        for conc, r in sorted(per.items(), key=lambda kv: int(kv[0])):
            if "failed" in r:
                rows.append([name, conc, f"failed: {r['failed'][:80]}", *[""] * 6])
                continue

            def pq(key: str, fmt: str, r: dict[str, Any] = r) -> str:
                return f"{r[key]['p50']:{fmt}} / {r[key]['p99']:{fmt}}" if key in r else "-"

            rows.append(
                [name, conc, r["requests"], r["errors"], pq("ttft_s", ".2f"), pq("itl_ms", ".1f"), pq("e2e_s", ".2f")]
                + [f"{r.get('output_tokens_per_s', 0):.2f}", r.get("prompt_tokens_p50", "-")]
            )
    return markdown_table(head, rows, numeric=range(1, len(head)))


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (key, label), ax in zip((("ttft_s", "time to first token (s)"), ("itl_ms", "inter-token latency (ms)")), axes):
        for i, (name, per) in enumerate(results["load"].items()):
            concs = sorted(int(c) for c in per if key in per[c] and "failed" not in per[c])
            color = f"C{i}"
            ax.plot(concs, [per[str(c)][key]["p50"] for c in concs], "o-", color=color, label=f"{name} p50")
            ax.plot(concs, [per[str(c)][key]["p99"] for c in concs], "x--", color=color, alpha=0.5, label=f"{name} p99")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({int(c) for per in results["load"].values() for c in per}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    a = results["args"]
    fig.suptitle(
        f"{a['model']}: {a['prompt_tokens']}-token prompts, {a['output_tokens']} output tokens, "
        f"requests per level {a['requests']}, {a['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(results: dict[str, Any], path: str) -> None:
    """Written after every level, so a run cut short keeps what it measured."""
    if path:
        results["targets"] = targets(results)
        write_json(path, results)
