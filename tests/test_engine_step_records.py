"""What the engine's observers get after every step (`StepRecord`), which is all a benchmark may
observe: under `strategy="auto"` the strategy auto chose and the cost model's prediction for every
engine strategy; the step's prefill spans, decode rows, produced requests and bytes per SP rank."""

from __future__ import annotations

import os
from pathlib import Path

from seqpar import LLM, SamplingParams, StepRecord
from seqpar.strategies.registry import over_cache_names
from test_engine import _save


def test_step_records_carry_what_benchmarks_read(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))  # the built-in machine profile
    model = _save(Path(tmp_path / "tiny"), "llama")[1]
    prompt = [(7 * i) % 90 + 3 for i in range(40)]
    records: list[StepRecord] = []
    with LLM(model=model, sp_size=2, block_size=4, strategy="auto", max_num_batched_tokens=16) as llm:
        llm.engine.observers.append(records.append)
        pids = llm.engine.rank_pids()
        assert len(pids) == 2 and all(os.kill(pid, 0) is None for pid in pids)  # the ranks, alive
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    rid = int(out.request_id)
    prefill, decode = [r for r in records if not r.decode_only], [r for r in records if r.decode_only]
    # 40 prompt tokens in chunks of at most 16, in order, then the two decode steps
    assert [r.prefill_spans for r in prefill] == [[(0, 16)], [(16, 32)], [(32, 40)]]
    assert sum(r.num_prefill_tokens for r in prefill) == len(prompt)
    assert [r.produced for r in records] == [[], [], [rid], [rid], [rid]]
    for r in prefill:
        assert r.num_decode == 0 and r.seconds > 0 and len(r.comm_bytes) == 2
        assert r.predicted_s is not None and set(r.predicted_s) == set(over_cache_names())
        assert r.strategy == min(r.predicted_s, key=r.predicted_s.get)  # auto took the cheapest
    assert len(decode) == 2
    for r in decode:
        assert r.num_decode == 1 and r.predicted_s is None and r.seconds > 0
