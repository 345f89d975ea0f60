"""The driver: requests in, tokens out. Scheduling, KV-cache accounting, sampling and
detokenization happen here; the ranks only run model steps.

Cache accounting is exact without asking the ranks: the driver knows how every
prompt is sharded (ShardPlan) and where every decoded token goes (placement), so
when it admits a request it reserves, per SP rank, the blocks the request can ever
need. Admitted requests therefore never run out of cache (no preemption needed),
and a request that could never fit is refused at once.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from seqpar.engine.config import EngineConfig
from seqpar.engine.detokenize import IncrementalDetokenizer, decode_logprobs
from seqpar.engine.executor import LocalExecutor, ProgressFn, TorchrunExecutor
from seqpar.engine.kv_cache import blocks_needed, size_cache
from seqpar.engine.outputs import EngineStats, RequestOutput
from seqpar.engine.sampling import Sampler, SamplingParams
from seqpar.engine.scheduler import Scheduler, Sequence
from seqpar.engine.validate import check_parallelism
from seqpar.engine.worker import Decode, Free, Prefill, StepResult
from seqpar.model import ModelConfig, load_config, load_tokenizer
from seqpar.sharding.plan import ShardPlan


def kv_blocks_per_rank(config: EngineConfig, mc: ModelConfig, local: bool = True) -> int:
    """Check the parallel layout against the model, then size each rank's KV cache.

    Every rank (and the driver, for its accounting) must agree on this number.
    """
    check_parallelism(config, mc, local=local)
    heads_cached = mc.num_kv_heads if config.strategy == "head_sharded" else mc.num_kv_heads // config.tp_size
    blocks = size_cache(mc.num_layers, heads_cached, mc.head_dim, config.torch_dtype,
                        int(config.kv_cache_gb * 2**30), config.block_size)
    if blocks < 2:
        raise ValueError(f"kv_cache_gb={config.kv_cache_gb} holds fewer than 2 KV blocks; give it more")
    return blocks


@dataclass
class Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    blocks: list[int]  # blocks reserved per SP rank
    held: list[int]  # tokens cached per SP rank
    prompt_logprobs: list | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    delta: str = ""


class LLMEngine:
    def __init__(self, config: EngineConfig, torchrun: bool = False):
        self.config = config
        mc = self.model_config = load_config(config.model)
        self.num_blocks = kv_blocks_per_rank(config, mc, local=not torchrun)
        self.tokenizer = load_tokenizer(config.model)
        context = mc.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's context of {context} tokens")
        # What one sequence can hold: its tokens spread over the SP ranks, +1 block per rank of slack
        # for partly filled blocks and uneven shards.
        capacity = (self.num_blocks - 1) * config.block_size * config.sp_size
        self.max_model_len = min(config.max_model_len or context, capacity)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self._fits, self.max_model_len)
        self.reserved = [0] * config.sp_size
        self.sampler = Sampler(config.seed)
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.last_step: StepResult | None = None
        self._bytes_sent = [0] * config.sp_size
        executor = TorchrunExecutor if torchrun else LocalExecutor
        self.executor = executor(config, self.num_blocks)

    # ---- admission ----------------------------------------------------------------
    def owner(self, held: list[int], position: int) -> int:
        """SP rank that caches the token at `position`, given tokens held per rank so far."""
        if self.config.placement == "round_robin":
            return position % self.config.sp_size
        return min(range(len(held)), key=lambda r: (held[r], r))  # least loaded, lowest rank on ties

    def _plan_blocks(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """(blocks per rank for the request's whole life, prompt tokens per rank)."""
        sp = self.config.sp_size
        prompt = list(ShardPlan([seq.num_prompt_tokens], sp, self.config.scheme).local_counts)
        held = list(prompt)
        for pos in range(seq.num_prompt_tokens, seq.max_total_tokens):
            held[self.owner(held, pos)] += 1
        return [blocks_needed(n, self.config.block_size) for n in held], prompt

    def _fits(self, batch: list[Sequence]) -> bool:
        need = list(self.reserved)
        for seq in batch:
            for r, b in enumerate(self._plan_blocks(seq)[0]):
                need[r] += b
        return all(n <= self.num_blocks for n in need)

    def add_request(self, prompt: str | list[int], params: SamplingParams) -> int:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
            text: str | None = prompt
        else:
            ids, text = [int(t) for t in prompt], None
        if not ids:
            raise ValueError("empty prompt: give at least one token (a non-empty string or token-id list)")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab}) for this model")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room to generate: this engine holds at most "
                f"{self.max_model_len} tokens per sequence (model context {self.model_config.max_position_embeddings}, "
                f"KV cache {self.num_blocks} blocks x {self.config.block_size} tokens x {self.config.sp_size} SP ranks); "
                "shorten the prompt, or raise kv_cache_gb / sp_size"
            )
        rid = next(self._ids)
        seq = Sequence(str(rid), ids, params, prompt=text)
        self.scheduler.add(seq)
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else next(iter(self.model_config.eos_token_ids), None)
        detok = IncrementalDetokenizer(self.tokenizer, params, eos, len(ids), self.max_model_len)
        self.requests[rid] = Request(seq, detok, [], [], metrics={"arrival": time.monotonic()})
        return rid

    # ---- stepping -----------------------------------------------------------------
    def step(self, on_progress: ProgressFn | None = None) -> list[int]:
        """Run one prefill or decode step; returns the ids of requests that produced tokens."""
        batch = self.scheduler.schedule()
        if batch.kind == "idle":
            return []
        reqs = [self.requests[int(s.request_id)] for s in batch.seqs]
        if batch.kind == "prefill":
            for req in reqs:
                req.blocks, req.held = self._plan_blocks(req.seq)
                self.reserved = [a + b for a, b in zip(self.reserved, req.blocks)]
            msg: Any = Prefill([r.seq.seq_id for r in reqs], [r.seq.prompt_token_ids for r in reqs],
                               [r.seq.params.prompt_logprobs for r in reqs])
        else:
            positions = [r.seq.num_tokens - 1 for r in reqs]
            owners = [self.owner(r.held, p) for r, p in zip(reqs, positions)]
            for r, o in zip(reqs, owners):
                r.held[o] += 1
            msg = Decode([r.seq.seq_id for r in reqs], [r.seq.last_token_id for r in reqs], positions, owners)
        result = self.executor.call(msg, on_progress)
        self.last_step = result
        self._bytes_sent = [a + b for a, b in zip(self._bytes_sent, result.comm_bytes)]
        self._sample(reqs, result, batch.kind == "prefill")
        finished = [r for r in reqs if r.detok.finished]
        if finished:
            self._release(finished)
        return [int(r.seq.request_id) for r in reqs]

    def _sample(self, reqs: list[Request], result: StepResult, prefill: bool) -> None:
        logits = torch.stack([result.logits[r.seq.seq_id] for r in reqs])  # [B, V]
        out = self.sampler(logits, [r.seq.params for r in reqs], [r.seq.generator for r in reqs])
        now = time.monotonic()
        for i, req in enumerate(reqs):
            seq = req.seq
            if prefill:
                req.metrics["first_token"] = now
                if seq.params.prompt_logprobs is not None:
                    got = result.prompt_logprobs.get(seq.seq_id, {})
                    req.prompt_logprobs = [None] + [got[t] for t in range(1, seq.num_prompt_tokens)]
                    decode_logprobs(self.tokenizer, req.prompt_logprobs)
            seq.output_token_ids.append(out.token_ids[i])
            seq.cumulative_logprob += out.logprobs[i]
            if out.top_logprobs[i] is not None:
                decode_logprobs(self.tokenizer, [out.top_logprobs[i]])
                seq.output_logprobs.append(out.top_logprobs[i])
            req.delta += req.detok.update(seq.output_token_ids)
            req.metrics["last_token"] = now
            req.metrics["kv_bytes_per_rank"] = list(result.kv_bytes)

    def _release(self, reqs: list[Request]) -> None:
        for req in reqs:
            self.scheduler.finish(req.seq)
            self.reserved = [a - b for a, b in zip(self.reserved, req.blocks)]
        self.last_step = self.executor.call(Free([r.seq.seq_id for r in reqs]))

    def output(self, rid: int) -> RequestOutput:
        req = self.requests[rid]
        seq = req.seq
        completion = req.detok.output(seq.output_token_ids, seq.cumulative_logprob,
                                      seq.output_logprobs if seq.params.logprobs is not None else None)
        m = req.metrics
        n = len(seq.output_token_ids)
        metrics = {
            "time_to_first_token_s": m.get("first_token", m["arrival"]) - m["arrival"],
            "decode_tokens_per_s": (n - 1) / (m["last_token"] - m["first_token"]) if n > 1 and m["last_token"] > m["first_token"] else None,
            "kv_cache_bytes_per_rank": m.get("kv_bytes_per_rank"),
            "prompt_tokens": seq.num_prompt_tokens,
            "output_tokens": n,
        }
        return RequestOutput(str(rid), seq.prompt, list(seq.prompt_token_ids), req.prompt_logprobs,
                             [completion], req.detok.finished, metrics)

    def pop_delta(self, rid: int) -> str:
        req = self.requests[rid]
        delta, req.delta = req.delta, ""
        return delta

    def abort(self, rids: list[int]) -> None:
        """Drop unfinished requests (an error elsewhere in their batch); their blocks return at once."""
        live = [self.requests[r] for r in rids if r in self.requests and not self.requests[r].detok.finished]
        for req in live:
            req.detok.finish_reason = "abort"
            if req.seq.status.value == "waiting":
                self.scheduler.finish(req.seq)
        started = [r for r in live if r.blocks]
        if started:
            self._release(started)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """Counts for metrics, from the driver's own books (no call to the ranks)."""
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=[r / self.num_blocks for r in self.reserved],
            sp_bytes_sent=list(self._bytes_sent),
        )

    def forget(self, rid: int) -> None:
        self.requests.pop(rid, None)

    def kv_bytes_per_rank(self) -> list[int]:
        """KV cache bytes in use on each SP rank, asked of the ranks themselves."""
        return list(self.executor.call(Free([])).kv_bytes)

    def shutdown(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown()
