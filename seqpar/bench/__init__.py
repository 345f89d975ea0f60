"""Benchmarks: `python -m seqpar.bench.attention` times every sequence-parallel
attention strategy against single-process attention and against other libraries'
implementations of the same algorithms (see `seqpar.bench.baselines`)."""
