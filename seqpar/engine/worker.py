"""One rank of the engine: its model shard, its share of the paged KV cache, and a step.

Every rank runs the same steps in the same order (the driver's messages are
broadcast from rank 0), so collectives inside the model always match up. Prefill
shards the batch's tokens with a ShardPlan and runs a sequence-parallel strategy;
decode runs every new token on every SP rank, caches its K/V on one rank only and
merges partial attention by LSE; since every SP rank then has the new tokens' final
hidden states, each computes the logits of its slice of the vocabulary (a
vocab-parallel head) and rank 0 joins the slices. Results go to rank 0 and from
there to the driver.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.collectives import STATS
from seqpar.comm.mesh import ParallelMesh
from seqpar.comm.shm import HostExchange
from seqpar.engine.config import EngineConfig
from seqpar.engine.kv_cache import PagedKVCache
from seqpar.engine.parallel import ShardedModel
from seqpar.engine.sampling import prompt_logprobs_rows
from seqpar.kernels.layout import TokenLayout
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.api import sp_attention
from seqpar.strategies.decode import gather_heads, local_partial, merge_partials
from seqpar.strategies.head_sharded import head_sharded_attention

# Below this many tokens per rank a ring step is too small to hide its latency:
# "auto" then gathers K/V in one collective instead.
_AUTO_RING_MIN_LOCAL_TOKENS = 512
# Step results up to this size (pickled) reach rank 0 through shared memory; larger ones
# (big batches, prompt logprobs) through the process group.
_RESULT_BYTES = 1 << 20


@dataclass
class Prefill:
    seq_ids: list[int]
    prompts: list[list[int]]
    prompt_logprobs: list[int | None]  # top-k per request, None = not wanted


@dataclass
class Decode:
    seq_ids: list[int]
    token_ids: list[int]
    positions: list[int]
    owners: list[int]  # SP rank that caches each new token


@dataclass
class Free:
    seq_ids: list[int]


@dataclass
class StepResult:
    logits: dict[int, Tensor]  # seq_id -> next-token logits [V] fp32
    prompt_logprobs: dict[int, dict[int, dict]]  # seq_id -> prompt index -> LogprobDict
    kv_bytes: list[int]  # KV cache bytes in use, per SP rank
    comm_bytes: list[int] = field(default_factory=list)  # bytes each SP rank sent in this step


class Worker:
    def __init__(self, config: EngineConfig, num_blocks: int, progress=None):
        self.config = config
        self.mesh = ParallelMesh.build(config.sp_size, config.tp_size)
        self.sharded = ShardedModel(config, self.mesh)
        self.model = self.sharded.model
        mc = self.model.config
        self.cache = PagedKVCache(mc.num_layers, num_blocks, config.block_size, self.sharded.num_kv_heads_cached,
                                  mc.head_dim, config.torch_dtype)
        self.scale = mc.head_dim ** -0.5
        # Decode merges a few KB per layer, and each step's results (a few vocabulary slices of
        # logits) go to rank 0: through shared memory when the ranks share a host.
        # (shared_memory=False: always the process group.)
        largest = max(config.max_num_seqs * mc.num_heads * (mc.head_dim + 1) * 4, _RESULT_BYTES)
        self.exchange = self.world_exchange = None
        if config.shared_memory:
            self.exchange = HostExchange.create(self.mesh.sp_group, largest, config.step_timeout_s)
            self.world_exchange = (self.exchange if config.tp_size == 1
                                   else HostExchange.create(None, _RESULT_BYTES, config.step_timeout_s))
        self.progress = progress  # rank 0 only: a queue for prefill progress (layers done)
        self.reports = self.mesh.tp_rank == 0  # one rank per SP position reports results
        vocab = mc.vocab_size
        chunk = -(-vocab // config.sp_size)
        self.vocab_slice = slice(min(vocab, self.mesh.sp_rank * chunk), min(vocab, (self.mesh.sp_rank + 1) * chunk))

    # ---- prefill ------------------------------------------------------------------
    def prefill(self, msg: Prefill) -> StepResult:
        cfg, mesh = self.config, self.mesh
        lens = [len(p) for p in msg.prompts]
        plan = ShardPlan(lens, cfg.sp_size, cfg.scheme)
        r = mesh.sp_rank
        idx = plan.local_indices(r)
        all_ids = torch.tensor([t for p in msg.prompts for t in p], dtype=torch.long)
        positions, seq_rows = plan.positions(r), plan.seq_ids(r)
        counts = [int((seq_rows == i).sum()) for i in range(len(lens))]
        self.cache.reserve_many({s: c for s, c in zip(msg.seq_ids, counts)})
        for i, s in enumerate(msg.seq_ids):
            self.cache.append_positions(s, positions[seq_rows == i])
        slots = self.cache.slot_mapping(msg.seq_ids, counts)
        strategy = self._pick_strategy(plan)
        seed_layout = strategy == "head_sharded"
        num_layers = self.model.config.num_layers

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if seed_layout:  # q, k, v for all tokens (replicated hidden); cache and ring only our shard
                k_loc, v_loc = k[idx], v[idx]
                self.cache.write(layer, slots, k_loc, v_loc)
                out = head_sharded_attention(q, k_loc, v_loc, plan, mesh.sp_group, True, self.scale,
                                             kv_head_ids=self.sharded.kv_head_ids)
            else:
                self.cache.write(layer, slots, k, v)
                out = sp_attention(q, k, v, plan=plan, group=mesh.sp_group, strategy=strategy, scale=self.scale,
                                   ulysses_degree=cfg.ulysses_degree if strategy == "usp" else None)
            if self.progress is not None:
                self.progress.put((layer + 1, num_layers))
            return out

        with torch.inference_mode():
            if seed_layout:
                all_pos = plan.global_layout.positions
                hidden = self.model(all_ids, all_pos, attention)[idx]  # keep this rank's rows
            else:
                hidden = self.model(all_ids[idx], positions, attention)
            result = StepResult({}, {}, [])
            if self.reports:
                self._prefill_outputs(msg, lens, seq_rows, positions, hidden, result)
        return self._gather(result)

    def _pick_strategy(self, plan: ShardPlan) -> str:
        if self.config.strategy != "auto":
            return self.config.strategy
        return "ring" if min(plan.local_counts) >= _AUTO_RING_MIN_LOCAL_TOKENS else "allgather"

    def _prefill_outputs(self, msg: Prefill, lens: list[int], seq_rows: Tensor, positions: Tensor,
                         hidden: Tensor, result: StepResult) -> None:
        """Logits of each sequence's last token, where it lives; prompt logprobs of local rows."""
        for i, s in enumerate(msg.seq_ids):
            rows = (seq_rows == i).nonzero().flatten()
            last = rows[positions[rows] == lens[i] - 1]
            if last.numel():
                result.logits[s] = self.model.compute_logits(hidden[last])[0]
            k = msg.prompt_logprobs[i]
            if k is not None:
                # row at position p predicts prompt token p + 1
                rows = rows[positions[rows] < lens[i] - 1]
                targets = [msg.prompts[i][p + 1] for p in positions[rows].tolist()]
                entries = prompt_logprobs_rows(lambda h: self.model.compute_logits(h), hidden[rows], targets, k)
                result.prompt_logprobs[s] = {p + 1: e for p, e in zip(positions[rows].tolist(), entries)}

    # ---- decode -------------------------------------------------------------------
    def decode(self, msg: Decode) -> StepResult:
        cfg, mesh = self.config, self.mesh
        me = mesh.sp_rank
        mine = [i for i, o in enumerate(msg.owners) if o == me]
        for i in mine:
            self.cache.reserve(msg.seq_ids[i], 1)
            self.cache.append_positions(msg.seq_ids[i], [msg.positions[i]])
        new_slots = self.cache.slot_mapping([msg.seq_ids[i] for i in mine], [1] * len(mine))
        mine_t = torch.tensor(mine, dtype=torch.long)
        # Where everything this rank caches for these sequences sits: one layout per step, all layers.
        k_layout = self.cache.layout(msg.seq_ids)
        q_layout = TokenLayout.build(list(range(len(msg.seq_ids))), msg.positions)
        ids = torch.tensor(msg.token_ids, dtype=torch.long)
        pos = torch.tensor(msg.positions, dtype=torch.long)
        seed_layout = cfg.strategy == "head_sharded"

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.cache.write(layer, new_slots, k[mine_t], v[mine_t])
            kh, vh = self.cache.storage(layer)  # read in place through k_layout's slot runs
            if seed_layout:
                return self.sharded.seed_decode(q, kh, vh, q_layout, k_layout, cfg.decode_merge, self.scale, self.exchange)
            out, lse = local_partial(q, kh, vh, q_layout, k_layout, self.scale)
            out = merge_partials(out, lse, mesh.sp_group, cfg.decode_merge, self.exchange).to(q.dtype)
            if cfg.decode_merge == "alltoall" and cfg.sp_size > 1:
                # alltoall leaves each rank its head slice (made for a row-parallel o_proj);
                # here every rank runs the whole o_proj, so gather the slices back.
                out = gather_heads(out, q.shape[1], mesh.sp_group, self.exchange)
            return out

        with torch.inference_mode():
            hidden = self.model(ids, pos, attention)
            result = StepResult({}, {}, [])
            if self.reports:  # this rank's vocabulary slice, for every sequence
                logits = self.model.compute_logits(hidden, self.vocab_slice)
                result.logits = {s: logits[j] for j, s in enumerate(msg.seq_ids)}
        return self._gather(result)

    def free(self, msg: Free) -> StepResult:
        for s in msg.seq_ids:
            if s in self.cache.seq_ids:
                self.cache.free(s)
        return self._gather(StepResult({}, {}, []))

    # ---- results ------------------------------------------------------------------
    def _gather(self, result: StepResult) -> StepResult:
        """Collect every rank's partial result on rank 0 (others get None back)."""
        result.kv_bytes = [self.cache.bytes_used()]
        result.comm_bytes = [STATS.total]
        mine = result if self.reports else None
        world, me = dist.get_world_size(), dist.get_rank()
        blobs = None
        if self.world_exchange is not None:
            blobs = self.world_exchange.all_gather_bytes(pickle.dumps(mine, protocol=pickle.HIGHEST_PROTOCOL))
        STATS.reset()  # results are control traffic: comm_bytes counts attention and merges only
        if blobs is not None:
            parts = [pickle.loads(b) for b in blobs] if me == 0 else None
        else:
            parts = [None] * world if me == 0 else None
            dist.gather_object(mine, parts, dst=0)
        if me != 0:
            return result
        merged = StepResult({}, {}, [])
        for part in parts:
            if part is None:
                continue
            for s, logits in part.logits.items():
                # decode: SP ranks report vocabulary slices in rank order; prefill: one rank each
                merged.logits[s] = torch.cat([merged.logits[s], logits]) if s in merged.logits else logits
            for s, entries in part.prompt_logprobs.items():
                merged.prompt_logprobs.setdefault(s, {}).update(entries)
            merged.kv_bytes += part.kv_bytes
            merged.comm_bytes += part.comm_bytes
        return merged

    def execute(self, msg: Prefill | Decode | Free) -> StepResult:
        if isinstance(msg, Prefill):
            return self.prefill(msg)
        if isinstance(msg, Decode):
            return self.decode(msg)
        if isinstance(msg, Free):
            return self.free(msg)
        raise TypeError(f"unknown engine message {type(msg).__name__}")
