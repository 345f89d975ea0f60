"""Prometheus metrics, vLLM's names under `seqpar:`, every series labelled `model_name`.

Engine-wide numbers (requests running and waiting, KV usage, preemptions, prefix cache,
bytes sent, restarts) are read from the AsyncLLM's snapshot at scrape time; per-request
numbers (tokens, latencies, finish reasons) are observed as each request's updates
reach its HTTP handler, with the engine thread's timestamps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from seqpar.engine.async_llm import RequestUpdate

disable_created_metrics()  # no `_created` series beside every counter (vLLM turns them off too)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's buckets: seconds, from 1 ms to minutes (long prompts on CPUs take that long).
_LATENCY = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector(Collector):
    def __init__(self, engine: Any, model_name: str):
        self.engine, self.name = engine, model_name

    def collect(self) -> Iterator[Metric]:
        s, name = self.engine.stats(), self.name

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        yield gauge("seqpar:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("seqpar:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        # One family: the fullest SP rank (what admission is bound by), plus one series per rank.
        kv = GaugeMetricFamily(
            "seqpar:kv_cache_usage_perc",
            "KV-cache usage, fraction 0-1: the fullest SP rank, and per rank (label rank).",
        )
        usage = list(s.kv_cache_usage)
        kv.add_sample("seqpar:kv_cache_usage_perc", {"model_name": name}, max(usage, default=0.0))
        for rank, u in enumerate(usage):
            kv.add_sample("seqpar:kv_cache_usage_perc", {"model_name": name, "rank": str(rank)}, u)
        yield kv
        yield counter("seqpar:num_preemptions", "Requests preempted by the scheduler.", s.num_preemptions)
        yield counter(
            "seqpar:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield counter("seqpar:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        # The KV store (--kv-store-host-gb, --kv-store-dir): zero without one.
        yield counter("seqpar:kv_store_hits", "Prompt tokens loaded from the KV store.", s.kv_store_hits)
        yield counter(
            "seqpar:kv_store_host_hits", "Blocks loaded from the KV store's host memory.", s.kv_store_host_hits
        )
        yield counter(
            "seqpar:kv_store_host_written_bytes",
            "Bytes of K/V copied to the KV store's host memory.",
            s.kv_store_host_bytes_written,
        )
        held = s.kv_store_host_bytes
        yield gauge("seqpar:kv_store_host_bytes", "Bytes of K/V held in the KV store's host memory.", held)
        yield counter(
            "seqpar:kv_store_misses",
            "Stored blocks that could not be loaded (damaged, truncated, foreign or gone) and were recomputed.",
            s.kv_store_misses,
        )
        yield counter("seqpar:kv_store_read_bytes", "Bytes of block files loaded.", s.kv_store_bytes_read)
        yield counter(
            "seqpar:kv_store_written_bytes",
            "Bytes of block files sent to the ranks to write (in the background).",
            s.kv_store_bytes_written,
        )
        yield counter(
            "seqpar:kv_store_load_seconds", "Seconds steps waited for blocks to load.", s.kv_store_load_seconds
        )
        yield counter(
            "seqpar:engine_restarts", "Times the engine rebuilt itself after a failure.", self.engine.num_restarts
        )
        sent = CounterMetricFamily(
            "seqpar:sp_bytes_sent", "Bytes each SP rank sent to the others.", labels=["model_name", "rank"]
        )
        for rank, b in enumerate(s.sp_bytes_sent):
            sent.add_metric([name, str(rank)], b)
        yield sent


class ServerMetrics:
    def __init__(self, engine: Any, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        labels, reg = ["model_name"], self.registry
        self.name = model_name
        self.prompt_tokens = Counter(
            "seqpar:prompt_tokens", "Prompt tokens of requests that started.", labels, registry=reg
        ).labels(model_name)
        self.generation_tokens = Counter("seqpar:generation_tokens", "Tokens generated.", labels, registry=reg).labels(
            model_name
        )
        self.success = Counter(
            "seqpar:request_success",
            "Requests that ended, by finish reason.",
            labels + ["finished_reason"],
            registry=reg,
        )
        self.ttft = Histogram(
            "seqpar:time_to_first_token_seconds", "Arrival to first token.", labels, buckets=_LATENCY, registry=reg
        ).labels(model_name)
        self.itl = Histogram(
            "seqpar:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            labels,
            buckets=_ITL,
            registry=reg,
        ).labels(model_name)
        self.e2e = Histogram(
            "seqpar:e2e_request_latency_seconds", "Arrival to last token.", labels, buckets=_LATENCY, registry=reg
        ).labels(model_name)
        self.queue = Histogram(
            "seqpar:request_queue_time_seconds",
            "Arrival to the start of the request's first step.",
            labels,
            buckets=_LATENCY,
            registry=reg,
        ).labels(model_name)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """One request's observations; `close()` counts a request that never finished as aborted."""

    def __init__(self, m: ServerMetrics):
        self.m = m
        self.last: float | None = None
        self.finished = False

    def observe(self, u: RequestUpdate) -> None:
        m = self.m
        if self.last is None:
            m.prompt_tokens.inc(len(u.output.prompt_token_ids))
            m.ttft.observe(u.time - u.arrival)
            if u.queue_time is not None:
                m.queue.observe(max(0.0, u.queue_time))
        elif u.token_ids:
            gap = (u.time - self.last) / len(u.token_ids)
            for _ in u.token_ids:
                m.itl.observe(gap)
        m.generation_tokens.inc(len(u.token_ids))
        self.last = u.time
        if u.finished:
            self.finished = True
            m.e2e.observe(u.time - u.arrival)
            m.success.labels(m.name, u.output.outputs[0].finish_reason or "stop").inc()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.m.success.labels(self.m.name, "abort").inc()
