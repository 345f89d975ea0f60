"""Smoke test of `seqpar bench core` on a tiny random model, every part, results in `--json`.
No speed assertions (the machine is shared): the targets' `met` are reported, not tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqpar.bench.core import main
from test_engine import _save


@pytest.mark.timeout(300)
def test_bench_core_runs_every_part(tmp_path, capsys) -> None:
    model = _save(Path(tmp_path / "tiny"), "llama")[1]
    out = tmp_path / "core.json"
    # sizes within the tiny model's 256-token context (--quick's are for the default model); SP 1 holds
    # ~124 tokens in 0.00003 GiB, so (d)'s prompt of 1.5 times that fits under the context at SP 2;
    # (a)-(c) in 0.01 GiB (~40,000 tokens), not the 1 GiB default every rank would zero at start
    sizes = ["--doc-tokens", "100", "--long-tokens", "150", "--chunk", "32", "--capacity-kv-cache-gb", "0.00003"]
    sizes += ["--kv-cache-gb", "0.01"]
    assert main(["--model", model, "--block-size", "4", *sizes, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["args"]["chunk"] == 32
    a = data["prefix_reuse"]
    assert a["second_cached_tokens"] > 0 and a["first_ttft_s"] > 0 and a["second_ttft_s"] > 0
    b = data["chunked_prefill"]
    assert b["same_token"] is True and len(b["chunked"]["peak_rss_mib"]) == 2  # one peak per SP rank
    c = data["decode_during_prefill"]
    assert c["chunked"]["prefill_steps"] > c["whole"]["prefill_steps"] == 1
    assert c["chunked"]["gaps"] >= c["chunked"]["prefill_steps"] - 1
    d = data["capacity"]
    assert set(d["tokens"]) == {"1", "2", "3", "4"} and d["served_at_sp2"]["prompt_tokens"] > d["tokens"]["1"]
    assert all(part in printed for part in ("prefix_reuse", "chunked_prefill", "capacity"))
