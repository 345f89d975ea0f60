"""The driver: requests in, tokens out. Scheduling, the KV block books of every SP rank,
sampling and detokenization happen here; the ranks only run model steps.

One step is schedule -> run -> postprocess: the scheduler picks each sequence's new
tokens under the token budget (allocating, reusing cached prefixes, preempting),
the ranks compute them where the block tables say, and the driver samples the
sequences whose chunk reached their last token.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from seqpar.costmodel.profile import load_profile
from seqpar.engine.admission import check_prompt
from seqpar.engine.auto_strategy import AutoStrategy
from seqpar.engine.block_manager import BlockManager
from seqpar.engine.config import EngineConfig
from seqpar.engine.detokenize import IncrementalDetokenizer, decode_logprobs
from seqpar.engine.dtype import resolve_dtype
from seqpar.engine.executor import EngineDeadError, LocalExecutor, ProgressFn, TorchrunExecutor
from seqpar.engine.kv_cache import block_bytes, kv_groups, size_cache
from seqpar.engine.kv_store import DriverStore
from seqpar.engine.messages import KVLoad, SeqStep, Step, StepResult
from seqpar.engine.outputs import EngineStats, RequestOutput, StepRecord
from seqpar.engine.parallel import decode_packing
from seqpar.engine.sampling_params import SamplingParams
from seqpar.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from seqpar.engine.sequence import Sequence
from seqpar.engine.tokenizer import LazyTokenizer
from seqpar.engine.validate import check_parallelism
from seqpar.model import ModelConfig, load_config

log = logging.getLogger(__name__)

StepObserver = Callable[[StepRecord], None]


def kv_blocks_per_rank(config: EngineConfig, mc: ModelConfig, local: bool = True) -> int:
    """Check the parallel layout against the model, then size each rank's KV cache.

    Every rank (and the driver, for its books) must agree on this number.
    """
    config, _ = resolve_dtype(config)  # the cache's bytes per block depend on it
    check_parallelism(config, mc, local=local)
    return size_cache(
        kv_groups(mc).size,
        mc.num_kv_heads // config.tp_size,
        mc.head_dim,
        config.torch_dtype,
        int(config.kv_cache_gb * 2**30),
        config.block_size,
        what=f"kv_cache_gb={config.kv_cache_gb}",
    )


@dataclass
class Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    prompt_logprobs: dict[int, Any] = field(default_factory=dict)  # position -> LogprobDict
    metrics: dict[str, Any] = field(default_factory=dict)
    delta: str = ""


class LLMEngine:
    def __init__(self, config: EngineConfig, torchrun: bool = False):
        # auto -> a concrete dtype here, once: the ranks get it in their config.
        config, why = resolve_dtype(config)
        self.config = config
        mc = self.model_config = load_config(config.model, config.rope_scaling)
        self.num_blocks = kv_blocks_per_rank(config, mc, local=not torchrun)
        self._tokenizer = LazyTokenizer(config.model)
        # Loaded now, when the model has one, so no request's latency includes it; a model
        # without one still starts and serves token-id prompts.
        self._tokenizer.get_or_none()
        context = mc.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's context of {context} tokens")
        placement = config.placement()
        groups = kv_groups(mc)
        # The store's tiers (kv_store.py): host memory the driver tracks, files whose existence it asks.
        store = config.kv_store_dir or config.kv_store_host_gb > 0
        self.kv_store = DriverStore(config, mc) if store else None
        self.blocks = BlockManager(placement, self.num_blocks, config.enable_prefix_caching, self.kv_store, groups)
        # The longest sequence the cache can hold alone, its blocks spread over the SP ranks.
        self.capacity = self.blocks.max_tokens(config.max_num_batched_tokens, context)
        self.max_model_len = min(config.max_model_len or context, self.capacity)
        if self.max_model_len < 2:
            raise ValueError(
                f"kv_cache_gb={config.kv_cache_gb} holds {self.capacity} tokens per sequence; give it more"
            )
        budget = config.max_num_batched_tokens
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=budget,
                long_prefill_token_threshold=config.long_prefill_token_threshold or max(1, budget // 2),
            ),
            self.blocks,
        )
        self.block_bytes = block_bytes(
            groups.size, mc.num_kv_heads // config.tp_size, mc.head_dim, config.torch_dtype, config.block_size
        )
        self._gone: list[int] = []
        self.requests: dict[int, Request] = {}
        self._next_id = 0
        self.observers: list[StepObserver] = []  # called with a StepRecord after every step (benchmarks, metrics)
        self.strategy_counts: Counter[str] = Counter()
        # auto: the cost model over this machine's profile (`seqpar tune`; a damaged file fails here)
        self.auto = AutoStrategy(config, mc, load_profile(), self.num_blocks) if config.strategy == "auto" else None
        self._bytes_sent = [0] * config.sp_size
        executor = TorchrunExecutor if torchrun else LocalExecutor
        self.executor = executor(config, self.num_blocks)
        if why:  # said once the engine is up (a failed start says only what failed)
            print(f"seqpar: dtype auto -> {config.dtype} ({why})", file=sys.stderr)
        _, why_not_packed = decode_packing(config, mc)  # what every rank decides the same way
        if why_not_packed:
            print(f"seqpar: {why_not_packed}", file=sys.stderr)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer; TokenizerUnavailableError (a ValueError) if it has none."""
        return self._tokenizer.get()

    def tokenizer_or_none(self) -> Any | None:
        return self._tokenizer.get_or_none()

    # ---- requests -----------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams) -> int:
        if params.stop:
            self._tokenizer.get("stop strings")  # they are matched in the detokenized text
        if isinstance(prompt, str):
            ids = self._tokenizer.get("a text prompt").encode(prompt, add_special_tokens=False) if prompt else []
            text: str | None = prompt
        else:
            ids, text = [int(t) for t in prompt], None
        check_prompt(ids, self.model_config.vocab_size, self.max_model_len, why=self.limit_reason())
        rid = self._next_id
        self._next_id += 1
        seq = Sequence(rid, ids, params, prompt=text)
        self.scheduler.add(seq)
        tokenizer = self.tokenizer_or_none()
        eos = None if tokenizer is None else tokenizer.eos_token_id
        if eos is None:
            eos = next(iter(self.model_config.eos_token_ids), None)
        detok = IncrementalDetokenizer(tokenizer, params, eos, len(ids), self.max_model_len)
        self.requests[rid] = Request(seq, detok, metrics={"arrival": time.monotonic()})
        return rid

    def limit_reason(self) -> str:
        """What sets `max_model_len`, for a refusal's message."""
        return (
            f" (this engine holds at most {self.max_model_len} tokens per sequence, the least of the model's context "
            f"of {self.model_config.max_position_embeddings} and its KV cache of {self.num_blocks} blocks x "
            f"{self.config.block_size} tokens on each of {self.config.sp_size} SP ranks: raise kv_cache_gb / sp_size "
            "for more)"
        )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -----------------------------------------------------------------
    def step(self, on_progress: ProgressFn | None = None) -> list[int]:
        """Run one step; returns the ids of requests that produced a token."""
        if self.executor.closed:  # a failed step stopped the ranks: nothing can run any more
            raise EngineDeadError("the engine's ranks are stopped after a failure; create a new engine")
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        promoted: list[tuple[int, int, bytes]] = []  # blocks loaded from disk, copied to host memory after the step
        if any(s.seq.loads for s in scheduled):
            scheduled = self._load_stored(scheduled, promoted)
        now = time.monotonic()
        for s in scheduled:
            self.requests[s.seq.seq_id].metrics.setdefault("scheduled", now)
        strategy, predicted = self._strategy(scheduled)
        msg = Step([self._seq_step(s) for s in scheduled], strategy, self._gone)
        if self.kv_store is not None:
            msg.kv_save, msg.kv_drop = self.kv_store.plan_saves(
                promoted + [e for s in scheduled for e in self.blocks.filled_blocks(s.seq, s.start + s.num_new)]
            )
        self._gone = []
        t0 = time.perf_counter()
        result = self.executor.call(msg, on_progress)
        elapsed = time.perf_counter() - t0
        self._bytes_sent = [a + b for a, b in zip(self._bytes_sent, result.comm_bytes)]
        self.scheduler.update(scheduled)
        sampled = [s for s in scheduled if s.wants_logits]
        for s in scheduled:
            got = result.prompt_logprobs.get(s.seq.seq_id)
            if got:
                self.requests[s.seq.seq_id].prompt_logprobs.update(got)
        if sampled:
            self._sample([self.requests[s.seq.seq_id] for s in sampled], result)
        for s in sampled:
            req = self.requests[s.seq.seq_id]
            if req.detok.finished:
                self._retire(req.seq)
        produced = [s.seq.seq_id for s in sampled]
        if self.observers:
            record = StepRecord(
                strategy,
                elapsed,
                [(s.start, s.start + s.num_new) for s in scheduled if not s.decode],
                sum(s.decode for s in scheduled),
                list(produced),
                list(result.comm_bytes),
                predicted,
            )
            for observe in self.observers:
                observe(record)
        return produced

    def _load_stored(self, scheduled: list[ScheduledSeq], promoted: list) -> list[ScheduledSeq]:
        """Have the ranks fill the blocks admission found in the KV store; a sequence whose load failed
        somewhere computes from its first failed block instead (the same tokens this step). The blocks
        kept that came from disk are added to `promoted`: host memory takes them after the step."""
        owner, key, entries, where = self.blocks.placement.owner, self.blocks.groups.key, [], []
        for s in scheduled:
            for i, g in s.seq.loads:
                entries.append((owner(i), s.seq.blocks[g][i], key(s.seq.block_hashes[i], g)))
                where.append((s.seq.seq_id, i))
        in_host = [self.kv_store.in_host(r, h) for r, _, h in entries]
        failed: dict[int, int] = {}
        t0 = time.perf_counter()
        result = self.executor.call(KVLoad(entries))
        self.kv_store.loaded(len(entries), len(result.failed), sum(in_host), time.perf_counter() - t0)
        for j in result.failed:
            seq_id, i = where[j]
            failed[seq_id] = min(i, failed.get(seq_id, i))
        out, bs = [], self.config.block_size
        for s in scheduled:
            seq = s.seq
            if not seq.loads:
                out.append(s)
                continue
            planned = len({i for i, _ in seq.loads}) * bs
            first = "scheduled" not in self.requests[seq.seq_id].metrics  # its first admission
            loaded = self.blocks.loaded(seq, failed.get(seq.seq_id))
            kept = len(seq.block_hashes)  # blocks below this are computed (cached, or loaded and kept)
            mine = [(e, i, host) for e, (sid, i), host in zip(entries, where, in_host) if sid == seq.seq_id]
            promoted += [e for e, i, host in mine if i < kept and not host]
            if first:
                seq.num_stored_tokens = loaded
                seq.num_host_tokens = len({i for _, i, host in mine if i < kept and host}) * bs
                seq.num_cached_tokens = max(0, (seq.num_cached_tokens or 0) - (planned - loaded))
            if seq.seq_id in failed:
                seq.num_computed_tokens = start = kept * bs
                s = ScheduledSeq(seq, start, s.num_new, decode=False)
                # a window group may lack blocks the recomputation writes or reads back to: none free
                # now, the sequence waits for the next schedule (which preempts if it must)
                if not self.blocks.allocate(seq, start + s.num_new):
                    continue
            out.append(s)
        return out

    def _seq_step(self, s: ScheduledSeq) -> SeqStep:
        seq, end = s.seq, s.start + s.num_new
        tokens = seq.all_token_ids
        k = seq.params.prompt_logprobs
        wants_plp = k is not None and s.start < seq.num_prompt_tokens - 1
        return SeqStep(
            seq.seq_id,
            tokens[s.start : end],
            s.start,
            [list(t) for t in seq.blocks],
            s.decode,
            s.wants_logits,
            seq.num_prompt_tokens,
            k if wants_plp else None,
            tokens[end] if wants_plp and end < len(tokens) else None,
            seq.params if s.wants_logits else None,
            self._banned(self.requests[seq.seq_id]) if s.wants_logits else [],
        )

    def _strategy(self, scheduled: list[ScheduledSeq]) -> tuple[str, dict[str, float] | None]:
        """The prefill strategy for this step, and under `auto` the cost model's predicted seconds
        per strategy (auto takes the cheapest and logs why)."""
        strategy, predicted = self.config.strategy, None
        if self.auto is not None:
            strategy, cost = self.auto.choose(scheduled)
            predicted = None if cost is None else dict(cost.seconds)
        self.strategy_counts[strategy] += 1
        return strategy, predicted

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._gone.append(seq.seq_id)  # rank 0 drops its sampling state with the next step

    def _sample(self, reqs: list[Request], result: StepResult) -> None:
        """Take the tokens rank 0 drew; detokenize; check stop rules."""
        now = time.monotonic()
        for req in reqs:
            seq = req.seq
            got = result.sampled[seq.seq_id]
            if "first_token" not in req.metrics:
                req.metrics["first_token"] = now
            seq.output_token_ids.append(got.token_id)
            seq.cumulative_logprob += got.logprob
            if got.top_logprobs is not None:
                decode_logprobs(self.tokenizer_or_none(), [got.top_logprobs])
                seq.output_logprobs.append(got.top_logprobs)
            req.delta += req.detok.update(seq.output_token_ids)
            req.metrics["last_token"] = now
            # this request's KV blocks per SP rank, every layer group's
            req.metrics["kv_bytes_per_rank"] = [n * self.block_bytes for n in self.blocks.held(seq)]

    def _banned(self, req: Request) -> list[int]:
        """Before `min_tokens` outputs, EOS (unless ignored) and the stop ids cannot be drawn (vLLM)."""
        p, seq = req.seq.params, req.seq
        if seq.num_output_tokens >= p.min_tokens:
            return []
        eos = [] if p.ignore_eos or req.detok.eos_token_id is None else [req.detok.eos_token_id]
        return eos + list(p.stop_token_ids)

    # ---- results ------------------------------------------------------------------
    def output(self, rid: int) -> RequestOutput:
        req = self.requests[rid]
        seq = req.seq
        completion = req.detok.output(
            seq.output_token_ids,
            seq.cumulative_logprob,
            seq.output_logprobs if seq.params.logprobs is not None else None,
        )
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [req.prompt_logprobs.get(t) for t in range(1, seq.num_prompt_tokens)]
            decode_logprobs(self.tokenizer_or_none(), prompt_logprobs)
        m = req.metrics
        n = len(seq.output_token_ids)
        metrics = {
            "time_to_first_token_s": m.get("first_token", m["arrival"]) - m["arrival"],
            "queue_time_s": m.get("scheduled", m["arrival"]) - m["arrival"],
            "decode_tokens_per_s": (n - 1) / (m["last_token"] - m["first_token"])
            if n > 1 and m["last_token"] > m["first_token"]
            else None,
            "kv_cache_bytes_per_rank": m.get("kv_bytes_per_rank"),
            "prompt_tokens": seq.num_prompt_tokens,
            "output_tokens": n,
            "dtype": self.config.dtype,
        }
        return RequestOutput(
            request_id=str(rid),
            prompt=seq.prompt,
            prompt_token_ids=list(seq.prompt_token_ids),
            prompt_logprobs=prompt_logprobs,
            outputs=[completion],
            finished=req.detok.finished,
            metrics=metrics,
            num_cached_tokens=seq.num_cached_tokens or 0,
            num_stored_tokens=seq.num_stored_tokens,
            num_host_tokens=seq.num_host_tokens,
        )

    def pop_delta(self, rid: int) -> str:
        req = self.requests[rid]
        delta, req.delta = req.delta, ""
        return delta

    def abort(self, rids: list[int]) -> None:
        """Drop unfinished requests; their blocks return to the pool at once."""
        for rid in rids:
            req = self.requests.get(rid)
            if req is not None and not req.detok.finished:
                req.detok.finish_reason = "abort"
                self._retire(req.seq)

    def forget(self, rid: int) -> None:
        self.requests.pop(rid, None)

    def stats(self) -> EngineStats:
        """Counts for metrics, from the driver's own books (no call to the ranks)."""
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.blocks.usage(),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits,
            kv_store_hits=self.blocks.store_hits,
            **(self.kv_store.counters() if self.kv_store is not None else {}),
            sp_bytes_sent=list(self._bytes_sent),
        )

    def rank_pids(self) -> list[int]:
        """The process id of each rank this engine started (under torchrun: this process only),
        for resource accounting such as a benchmark's peak memory per rank."""
        return self.executor.pids

    def shutdown(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown()
