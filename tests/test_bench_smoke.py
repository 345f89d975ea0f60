"""Smoke test of the attention benchmark on tiny shapes: every row runs, seqpar rows are exact.

Speed is not asserted (CI machines are shared); only that timings are positive numbers
and that every seqpar strategy matches the single-process output.
"""

from __future__ import annotations

import json
import math
import time

from seqpar.bench.attention import ERROR_TOL, main


def test_attention_bench_quick(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    # PyTorch's ring ships with torch, so it runs here too; DeepSpeed is an optional extra.
    rc = main(["--quick", "--world", "2", "--baselines", "torch_ring", "--json", str(out)])
    elapsed = time.perf_counter() - t0
    table = capsys.readouterr().out
    assert rc == 0
    assert elapsed < 40, f"the quick benchmark took {elapsed:.1f}s"

    data = json.loads(out.read_text())
    rows = data["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("single") == 2
    strategies = {r["strategy"] for r in rows if r["kind"] == "seqpar"}
    assert strategies == {"ring", "pass_q", "allgather", "ulysses", "usp"}
    pairs = {(r["strategy"], r["scheme"]) for r in rows if r["kind"] == "seqpar"}
    assert pairs >= {("ring", "zigzag"), ("ring", "contiguous")}
    assert {r["ulysses_degree"] for r in rows if r["strategy"] == "usp"} == {1, 2}

    for r in rows:
        if r["kind"] not in ("single", "seqpar"):
            continue
        name = f"{r['label']} [{r['scheme']}]"
        assert r["error"] is None, f"{name}: {r['error']}"
        assert r["max_abs_error"] is not None and r["max_abs_error"] < ERROR_TOL, f"{name}: error {r['max_abs_error']}"
        assert r["samples_s"] and all(isinstance(t, float) and t > 0 and math.isfinite(t) for t in r["samples_s"]), name
        assert r["median_s"] > 0 and r["speedup_vs_single_1_thread"] > 0, name
        assert r["label"] in table

    # The baseline reports either numbers or its exact error, never nothing.
    for r in rows:
        if r["kind"] == "torch_ring":
            assert (r["error"] is not None) or (r["median_s"] > 0 and r["max_abs_error"] < ERROR_TOL), r
