"""Smoke test of `seqpar bench auto --quick` on a tiny random model: every grid point and prefill
row is produced with positive times, auto's pick is one of the engine's strategies. No speed
assertions (the machine is shared): whether auto is within 10% is reported, not tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqpar.bench.auto import STRATEGIES, main
from test_engine import _save


@pytest.mark.timeout(300)  # four engines start side by side, on a shared machine
def test_bench_auto_quick(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))  # the built-in profile
    model = _save(Path(tmp_path / "tiny"), "llama")[1]
    out = tmp_path / "auto.json"
    assert main(["--quick", "--model", model, "--block-size", "4", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["grid"]["rows"]
    assert {(r["new"], r["cached"]) for r in rows} == {(4, 0), (32, 0), (4, 64), (32, 64)}
    for r in rows:
        assert all(r["measured_s"][s] > 0 for s in STRATEGIES)
        assert r["auto_pick"] in STRATEGIES[:-1] and r["fastest"] in STRATEGIES[:-1]
        assert isinstance(r["auto_within_10pct"], bool)
    assert 0 <= data["grid"]["auto_share"] <= 1
    pre = data["prefill"]["rows"]
    assert [(r["sp"], r["tokens"]) for r in pre] == [(1, 64), (2, 64)]
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in pre)
    assert "auto within 10% of the fastest" in table and "predicted / measured" in table
