"""Benchmarks, one module or package per `seqpar bench NAME` (the names: `seqpar.cli.BENCHES`).

- `attention`: every sequence-parallel attention strategy against one process and other
  libraries' implementations of the same algorithms (`baselines.py`);
- `engine`: the engine end to end at SP 1 and SP 2 against transformers;
- `core`: prefix reuse, chunked prefill, decode latency during a long prefill, capacity;
- `decode`: decode ms/token and batched throughput against transformers;
- `serve`: `seqpar serve` under load against llama.cpp's server;
- `auto`: `strategy="auto"`'s picks and predictions against every strategy measured.

They use the public API and observe through the engine's `observers` (a `StepRecord` per step)
and torch.profiler; none patches what it times or reads the engine's own state. `report.py`
holds what their mains share: `--json` and the results file, summary lines, markdown tables.
"""
