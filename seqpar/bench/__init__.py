"""Benchmarks, one module or package per `seqpar bench NAME` (the names: `seqpar.cli.BENCHES`).

- `attention`: every sequence-parallel attention strategy against one process and other
  libraries' implementations of the same algorithms (`baselines.py`);
- `engine`: the engine end to end at SP 1 and SP 2 against transformers;
- `core`: prefix reuse, chunked prefill, decode latency during a long prefill, capacity;
- `decode`: decode ms/token and batched throughput against transformers;
- `serve`: `seqpar serve` under load against llama.cpp's server.

They observe through the engine's `observers` hook and torch.profiler; none patches what it times.
"""
