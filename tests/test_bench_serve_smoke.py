"""Smoke test of the serving benchmark (`seqpar bench serve --quick`) on a tiny random model: a real
`seqpar serve` driven by the openai client (2 requests at concurrency 1 and 2) and one paired 1-token
HTTP / LLM.generate run; the results file, the table and the targets are produced. No speed assertions,
no bench virtualenv (guidellm and llama.cpp are not needed). Plus guidellm's report parsed from a
minimal stand-in with its field names."""

from __future__ import annotations

import json

import pytest

from seqpar.bench import serve
from seqpar.bench.serve_load import parse_guidellm, percentile
from seqpar.bench.serve_report import table
from server_util import save_tiny_chat_model


@pytest.mark.timeout(180)
def test_bench_serve_quick(tmp_path, capsys):
    model = save_tiny_chat_model(tmp_path / "tiny")
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    rc = serve.main(
        [
            "--quick",
            "--model",
            model,
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
            "--plot",
            str(png) if _has_matplotlib() else "",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    assert set(data["load"]) == {"sp1"} and set(data["load"]["sp1"]) == {"1", "2"}
    for level in data["load"]["sp1"].values():
        assert level["requests"] == 2 and level["errors"] == 0
        assert level["output_tokens_min"] == 4  # ignore_eos: every request runs to max_tokens
        assert 0 < level["ttft_s"]["p50"] <= level["ttft_s"]["p99"] <= level["e2e_s"]["p99"]
        assert level["itl_ms"]["p50"] > 0 and level["output_tokens_per_s"] > 0
    one = data["one_token"]
    assert one["same_text"] and len(one["pairs"]) == 1 and one["ratio"] > 0
    assert data["targets"]["sp1_errors_c2"]["met"]
    assert "| sp1 | 2 | 2 | 0 |" in table(data) and "| sp1 | 2 | 2 | 0 |" in printed
    if _has_matplotlib():
        assert png.stat().st_size > 0


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_percentile_is_nearest_rank():
    vals = [4.0, 1.0, 3.0, 2.0]
    assert [percentile(vals, p) for p in (50, 75, 90, 99)] == [2.0, 3.0, 4.0, 4.0]
    assert percentile(list(range(1, 9)), 99) == 8  # 8 requests: p99 is the slowest


def test_parse_guidellm_report(tmp_path):
    def request(start: float, ttft: float, n: int, itl: float) -> dict:
        first = start + ttft
        return {
            "info": {
                "timings": {
                    "request_start": start,
                    "first_token_iteration": first,
                    "last_token_iteration": first + (n - 1) * itl,
                    "request_end": first + (n - 1) * itl + 0.01,
                },
                "error": None,
            },
            "input_metrics": {"text_tokens": 100},
            "output_metrics": {"text_tokens": n},
        }

    pcts = {"percentiles": {"p50": 1.0, "p99": 2.0}}
    report = {
        "benchmarks": [
            {
                "duration": 10.0,
                "requests": {
                    "successful": [request(0.0, 1.0, 5, 0.1), request(1.0, 3.0, 5, 0.3)],
                    "errored": [{"info": {"error": "boom"}}],
                },
                "metrics": {
                    "request_totals": {"successful": 2, "errored": 1, "incomplete": 0, "total": 3},
                    **{
                        k: {"successful": pcts}
                        for k in ("time_to_first_token_ms", "inter_token_latency_ms", "request_latency")
                    },
                },
            }
        ]
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    r = parse_guidellm(path)
    assert r["requests"] == 2 and r["errors"] == 1 and r["errors_seen"] == ["boom"]
    assert r["ttft_s"]["p50"] == pytest.approx(1.0) and r["ttft_s"]["p99"] == pytest.approx(3.0)
    assert r["itl_ms"]["p50"] == pytest.approx(100.0) and r["itl_ms"]["p99"] == pytest.approx(300.0)
    assert r["output_tokens_per_s"] == pytest.approx(1.0) and r["prompt_tokens_p50"] == 100
