"""One rank of the engine: its model shard, its share of the paged KV cache, and a step.

Every rank runs the same steps in the same order (the driver's messages are
broadcast from rank 0), so collectives inside the model always match up. A step
carries two kinds of rows, in one forward pass:
- decode rows (one new token of a generating sequence) run on every SP rank; the
  owner of the token's position caches its K/V; each rank attends over its cached
  share and the partials are merged by LSE. Every SP rank then has the final hidden
  states, so each computes the logits of its slice of the vocabulary.
- prefill rows (a chunk of a prompt, over whatever is cached before it) are sharded by
  position (`Placement`): each rank computes the tokens it will cache, writes their
  K/V, and attends over every rank's cache by pass-KV, pass-Q or all-gather. The owner
  of a chunk's last token computes its logits.
Results go to rank 0 and from there to the driver.
"""

from __future__ import annotations

import pickle
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn

from seqpar.comm.collectives import STATS
from seqpar.comm.launch import shares_gpu
from seqpar.comm.mesh import ParallelMesh
from seqpar.comm.shm import HostExchange
from seqpar.engine.config import EngineConfig
from seqpar.engine.decode_graph import GroupRows, StaticDecode
from seqpar.engine.kv_cache import KVCache, kv_groups
from seqpar.engine.kv_store import RankStore
from seqpar.engine.messages import KVLoad, KVLoadResult, Sampled, Step, StepResult
from seqpar.engine.parallel import ShardedModel
from seqpar.engine.sampling import Sampler, make_generator, prompt_logprobs_rows
from seqpar.engine.step_plan import StepPlan
from seqpar.kernels.backends import choose
from seqpar.kernels.decode import DecodeBatch
from seqpar.kernels.gpu.paged import PagedDecode, triton_usable
from seqpar.kernels.invariant import vocab_slices
from seqpar.model import deterministic as det
from seqpar.model import load_config
from seqpar.model.compiled import compile_tiles
from seqpar.model.llama import ROW_TILE
from seqpar.strategies import canonical
from seqpar.strategies.decode import gather_heads, merge_partials
from seqpar.strategies.over_cache import attention_over_cache, kv_exchange_bytes

# Step results up to this size (pickled) reach rank 0 through shared memory; larger ones
# (big batches, prompt logprobs) through the process group.
_RESULT_BYTES = 1 << 20


class Worker:
    def __init__(self, config: EngineConfig, num_blocks: int, progress=None):
        self.config = config
        self.mesh = ParallelMesh.build(config.sp_size, config.tp_size)
        mc = load_config(config.model, config.rope_scaling)
        # Decode merges and split projections move a few KB per layer, and each step's results
        # (a few vocabulary slices of logits) go to rank 0: through shared memory when the ranks
        # share a host. (shared_memory=False: always the process group.)
        row = max(mc.num_heads * (mc.head_dim + 1), mc.hidden_size) * 4
        largest = max(config.max_num_seqs * row, _RESULT_BYTES)
        self.exchange = self.world_exchange = None
        # HostExchange copies tensors through host memory: CPU ranks', and those of ranks sharing a GPU
        # (gloo); ranks with a GPU each keep everything on the GPUs, over NCCL.
        if config.shared_memory and (config.device == "cpu" or shares_gpu(config.device)):
            self.exchange = HostExchange.create(self.mesh.sp_group, largest, config.step_timeout_s)
            self.world_exchange = (
                self.exchange
                if config.tp_size == 1
                else HostExchange.create(None, _RESULT_BYTES, config.step_timeout_s)
            )
        self.sharded = ShardedModel(config, self.mesh, self.exchange)
        self.model = self.sharded.model
        self._compile_tiles(config)
        self.placement = config.placement()
        # this rank's attention backend (kernels/backends.py), chosen once: the kernels' dense blocks,
        # how decode rows read the cache, whether decode steps run over static buffers
        self.backend = choose(config.attention_backend, config.device)
        # Decode steps over static buffers (decode_graph.py), replayed as CUDA graphs on cuda (at SP > 1,
        # pieces cut at the collectives); their padding rows, and at SP > 1 the rows whose new token
        # another rank caches, write into one scratch block past those the driver hands out.
        static = (
            self.backend.static_decode
            and config.tp_size == 1
            and not config.enforce_eager
            and not config.enable_deterministic_inference
        )
        # layer groups sharing the cache's blocks (a window group frees what left its window)
        self.groups = kv_groups(mc)
        self.cache = KVCache(
            self.groups.size,
            num_blocks + static,
            config.block_size,
            self.sharded.num_kv_heads_cached,
            mc.head_dim,
            config.torch_dtype,
            config.device,
        )
        self.device = torch.device(config.device)
        # the paged decode kernel: Triton's where the backend asks for it and Triton runs here
        self._triton = self.backend.triton_decode and triton_usable(self.device)
        # kv_store_dir: this rank's folder of full blocks (written in the background after steps)
        store = config.kv_store_dir or config.kv_store_host_gb > 0
        self.kv_store = RankStore(config, self.mesh.sp_rank, self.mesh.tp_rank) if store else None
        self.scale = mc.attention_scale
        # Pass-KV messages (a rank's cached K/V of a step, per layer) through shared memory too.
        self.kv_exchange = None
        if self.exchange is not None:
            kv_bytes = kv_exchange_bytes(
                num_blocks * config.block_size, self.cache.num_kv_heads, mc.head_dim, config.torch_dtype.itemsize
            )
            self.kv_exchange = HostExchange.create(self.mesh.sp_group, kv_bytes, config.step_timeout_s)
        self.decode_workspace: dict[str, Tensor] = {}  # DecodeBatch's gather buffers, kept across steps
        self.progress = progress  # rank 0 only: a queue for prefill progress (layers done)
        # Rank 0 samples (as vLLM's workers do): only token ids and asked-for log-probs go to the
        # driver, never [B, V] logits. Seeded requests keep their own generator here.
        self.sampler = Sampler(config.seed)
        self.generators: dict[int, torch.Generator | None] = {}
        self.reports = self.mesh.tp_rank == 0  # one rank per SP position reports results
        vocab = mc.vocab_size
        chunk = -(-vocab // config.sp_size)
        self.vocab_slice = slice(min(vocab, self.mesh.sp_rank * chunk), min(vocab, (self.mesh.sp_rank + 1) * chunk))
        self.deterministic = config.enable_deterministic_inference
        if self.deterministic:  # slices of whole GEMM tiles: a column's bits do not depend on the slicing
            self.vocab_slice = vocab_slices(vocab, config.sp_size)[self.mesh.sp_rank]
        self.decode_head = self.sharded.decode_head(self.vocab_slice)  # None unless decode steps pack
        self.static_decode = None
        # the static step's unseeded rows that do not sample greedily sample on its device
        self.device_sampler = Sampler(config.seed, self.device)
        if static:
            # a row's pages here: at most its whole sequence's blocks (max_model_len, else the model's context)
            longest = config.max_model_len or mc.max_position_embeddings
            self.static_decode = StaticDecode(
                self.sharded.decode_model or self.model,
                self.cache,
                config.block_size,
                min(num_blocks, -(-longest // config.block_size)),
                config.max_num_seqs,
                num_blocks * config.block_size,
                self.scale,
                capture=config.device == "cuda",
                use_triton=self._triton,
                groups=self.groups,
                merge=self._merged if config.sp_size > 1 else None,
                vocab=self.vocab_slice,
                head=self.decode_head,
            )

    def _compile_tiles(self, config: EngineConfig) -> None:
        """Long steps' per-token work through torch.compile (seqpar.model.compiled), unless nothing
        here can use it: eager asked for, deterministic GEMMs, or no rank ever gets a full tile."""
        rows = -(-config.max_num_batched_tokens // config.sp_size)
        if config.enforce_eager or config.enable_deterministic_inference or rows < ROW_TILE:
            return
        if self.model.config.architecture == "gemma3":  # its layers (four norms) run whole chunks, untiled
            return
        seconds, why = compile_tiles(self.model)
        if dist.get_rank() == 0:
            said = f"compiled in {seconds:.1f} s" if why is None else f"eager: {why}"
            what = f"{ROW_TILE}-row tiles" if config.device == "cpu" else f"chunks of {ROW_TILE}+ rows"
            print(f"seqpar: per-token work of {what} {said}", file=sys.stderr)

    def step(self, msg: Step) -> StepResult:
        mesh = self.mesh
        plan = StepPlan(msg, self.placement, mesh.sp_rank)
        # every other layer group's blocks (a model without sliding windows has one group)
        plans = [plan] + [StepPlan(msg, self.placement, mesh.sp_rank, g) for g in range(1, len(self.groups))]
        nd = len(plan.decode)
        if nd and not plan.prefill and self.static_decode is not None:
            return self._static_step(msg, plans)  # reads the plans on the host: before plan.to
        if self.device.type != "cpu":
            for p in plans:
                p.to(self.device)
        num_layers = self.model.config.num_layers
        # Every decode row in one call per layer: on CPU the flash kernel per length bucket
        # (kernels/decode.py), on a paged backend the kernel over a block table (kernels/gpu/paged.py).
        units = None
        batches: dict[int, DecodeBatch | PagedDecode] = {}
        if nd and self.deterministic:  # per layer group, the same for every layer of it
            units = {g: self._decode_units(p, w) for g, (p, w) in enumerate(zip(plans, self.groups.windows))}
        elif nd and not self.backend.paged_decode:
            # per layer group; a sliding window's: each row's keys within its window only
            batches = {
                g: DecodeBatch(p.decode_slots if w is None else p.decode_slots_within(w), self.decode_workspace)
                for g, (p, w) in enumerate(zip(plans, self.groups.windows))
            }
        elif nd:  # per layer group; a sliding window's rows from their window's first key
            batches = {g: self._paged(p, w) for g, (p, w) in enumerate(zip(plans, self.groups.windows))}

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            g, j = self.groups.where(layer)
            p = plans[g]
            self.cache.write(j, p.write_slots, k[p.write_rows], v[p.write_rows])
            kh, vh = self.cache.storage(j)  # read in place through slot runs
            window = self.groups.windows[g]
            if self.deterministic:
                return self._canonical_attention(q, kh, vh, p, units and units[g], window)
            outs = []
            if nd:
                outs.append(self._merged(*batches[g].attend(q[:nd], kh, vh, self.scale)).to(q.dtype))
            if plan.prefill:
                out = attention_over_cache(
                    q[nd:],
                    plan.q_layouts,
                    kh,
                    vh,
                    p.keys if window is None else p.keys_within(window),
                    mesh.sp_group,
                    msg.strategy,
                    self.scale,
                    self.kv_exchange,
                    window,
                )
                outs.append(out.to(q.dtype))
                if self.progress is not None:
                    self.progress.put((layer + 1, num_layers))
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        # Decode-only steps with the MLP split over the SP ranks (parallel.py); attention as ever.
        model = self.sharded.decode_model if not plan.prefill and self.sharded.decode_model is not None else self.model
        result = StepResult()
        with torch.inference_mode():
            hidden = model(torch.tensor(plan.ids, dtype=torch.long, device=self.device), plan.positions, attention)
            if self.reports:
                if nd:  # this rank's vocabulary slice, for every decode row
                    # on the host (a no-op on CPU): rank 0 samples there, and results are pickled
                    logits = self._logits(hidden[:nd], self.vocab_slice, self.decode_head).cpu()
                    # clone: no shared storage to pickle
                    result.logits = {s.seq_id: logits[j].clone() for j, s in enumerate(plan.decode)}
                self._prefill_outputs(plan, hidden[nd:], result)
        result = self._gather(result)
        if dist.get_rank() == 0:
            if self.deterministic and nd and self.vocab_slice != slice(0, self.model.config.vocab_size):
                # decode rows' logits whole now: their top refined as a prefill row's (rank 0's
                # hidden rows are every SP rank's bits)
                rows = torch.stack([result.logits[s.seq_id] for s in plan.decode])  # [nd, V]
                with torch.inference_mode():
                    det.refine(self.model, rows, hidden[:nd].cpu())
                result.logits.update((s.seq_id, rows[j]) for j, s in enumerate(plan.decode))
            self._sample(msg, result)
        return result

    def _merged(self, out: Tensor, lse: Tensor) -> Tensor:
        """Decode rows' partials over this rank's keys [B, H, D] fp32, merged with every SP rank's."""
        cfg, group = self.config, self.mesh.sp_group
        heads = out.shape[1]
        out = merge_partials(out, lse, group, cfg.decode_merge, self.exchange)
        if cfg.decode_merge == "alltoall" and cfg.sp_size > 1:
            # alltoall leaves each rank its head slice (made for a row-parallel o_proj);
            # here every rank runs the whole o_proj, so gather the slices back.
            out = gather_heads(out, heads, group, self.exchange)
        return out

    def _logits(self, hidden: Tensor, vocab: slice = slice(None), head: nn.Module | None = None) -> Tensor:
        if self.deterministic:
            return det.logits(self.model, hidden, vocab)
        return self.model.compute_logits(hidden, vocab, head)

    def _canonical_attention(
        self, q: Tensor, kh: Tensor, vh: Tensor, plan: StepPlan, units, window: int | None
    ) -> Tensor:
        """Deterministic inference: every row in the canonical order (seqpar.strategies.canonical);
        `plan`: the layer group's; `units`: its `canonical.DecodeUnits` (None without decode rows)."""
        nd, outs = len(plan.decode), []
        pl = self.placement
        if nd:
            outs.append(units(q[:nd], kh, vh).to(q.dtype))
        if plan.prefill:
            rows = [(s.start + len(s.token_ids), pos) for s, pos in plan.prefill_rows]
            out = canonical.prefill(
                q[nd:],
                rows,
                kh,
                vh,
                plan.keys,
                pl.unit_tokens,
                self.mesh.sp_group,
                self.scale,
                self.kv_exchange,
                window,
            )
            outs.append(out.to(q.dtype))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _paged(self, plan: StepPlan, window: int | None) -> PagedDecode:
        """A layer group's decode rows as a block table on the device (a window's from its first key)."""
        pages, lens, starts = plan.decode_table(window)
        cfg = self.config
        return PagedDecode(pages, lens, cfg.block_size, self.device, self.cache.num_kv_heads, starts, self._triton)

    def _decode_units(self, plan: StepPlan, window: int | None) -> canonical.DecodeUnits:
        pl = self.placement
        return canonical.DecodeUnits(
            [(s.start, s.blocks[plan.group]) for s in plan.decode],
            lambda u: pl.owner(u * pl.shard_blocks),
            pl.block_size,
            pl.shard_blocks,
            self.mesh.sp_group,
            self.scale,
            self.exchange,
            window,
        )

    def _static_step(self, msg: Step, plans: list[StepPlan]) -> StepResult:
        """A decode-only step through the static buffers (graph replays on CUDA). Rows that sample
        greedily without log-probs or banned tokens take the token chosen on the device (one small
        copy back; at SP > 1 from every rank's top, `_sliced_step`); the others' logits go to the
        sampler as in any step."""
        plan, static = plans[0], self.static_decode
        groups = []
        for p, w in zip(plans, self.groups.windows):
            slots = [static.scratch_slot] * len(plan.decode)  # rows whose new token another rank caches
            for row, slot in zip(p.write_rows.tolist(), p.write_slots.tolist()):
                slots[row] = slot
            groups.append(GroupRows(slots, *p.decode_table(w)))
        with torch.inference_mode():
            out = static.run(plan.ids, plan.positions.tolist(), groups)
            if out.greedy is None:  # SP > 1: this rank's slice of the vocabulary
                return self._sliced_step(msg, plan, out.logits)
            picked = torch.stack([out.greedy.double(), out.logprob.double()]).cpu()  # [2, n]
        result = StepResult(comm_bytes=[0])
        # Unseeded rows that sample otherwise do so on the device too (their [V] logits never copied,
        # top-p's sort not on the host). Seeded rows keep their host generator: a seed's tokens must
        # not depend on which of a request's steps ran here and which in a mixed step.
        others = []
        for j, s in enumerate(plan.decode):
            p = s.sampling
            if self._greedy_on_device(s):
                result.sampled[s.seq_id] = Sampled(int(picked[0, j]), float(picked[1, j]), None)
            elif p is not None and p.seed is None and not self.deterministic:
                others.append((j, s))
            elif s.logits:
                result.logits[s.seq_id] = out.logits[j].cpu()
        if others:
            rows = torch.tensor([j for j, _ in others], device=self.device)
            drawn = self.device_sampler(
                out.logits.index_select(0, rows), [s.sampling for _, s in others], None, [s.banned for _, s in others]
            )
            for i, (_, s) in enumerate(others):
                result.sampled[s.seq_id] = Sampled(drawn.token_ids[i], drawn.logprobs[i], drawn.top_logprobs[i])
        self._sample(msg, result)
        return result

    def _sliced_step(self, msg: Step, plan: StepPlan, logits: Tensor) -> StepResult:
        """A static step's end at SP > 1, from this rank's vocabulary slice of the logits [n, V_r]: a
        greedy row sends rank 0 its slice's top logit, token and logsumexp (three numbers, not V_r);
        the others their slice, sampled on rank 0 as in an eager step."""
        greedy = [self._greedy_on_device(s) for s in plan.decode]
        if logits.shape[1]:
            top, ids = logits.max(dim=-1)  # the first of equal tops: the lowest id, as argmax
            parts = torch.stack(
                [top.double(), (ids + self.vocab_slice.start).double(), logits.logsumexp(-1).double()], 1
            )
            parts = parts.cpu().tolist()  # a wait on the device (and one more below, for rows sent whole)
        else:  # no vocabulary here (fewer ids than ranks): nothing to offer
            parts = [[float("-inf"), -1, float("-inf")]] * len(plan.decode)
        rest = [j for j, g in enumerate(greedy) if not g]
        sliced = dict(zip(rest, logits[rest].cpu())) if rest else {}  # row -> its slice, on the host
        result = StepResult()
        for j, s in enumerate(plan.decode):
            if greedy[j]:
                top_j, token, lse = parts[j]
                result.tops[s.seq_id] = [(top_j, int(token), lse)]
            else:  # (each row cloned: no shared storage to pickle)
                result.logits[s.seq_id] = sliced[j].clone()
        result = self._gather(result)
        if dist.get_rank() == 0:
            for seq_id, ranks in result.tops.items():
                best = max(range(len(ranks)), key=lambda r: (ranks[r][0], -r))  # ties: the lowest rank's, id
                lse = torch.logsumexp(torch.tensor([r[2] for r in ranks], dtype=torch.float64), 0)
                result.sampled[seq_id] = Sampled(ranks[best][1], float(ranks[best][0] - lse), None)
            result.tops = {}
            self._sample(msg, result)
        return result

    @staticmethod
    def _greedy_on_device(s) -> bool:
        """A row whose token is its logits' argmax and whose only log-prob is that token's."""
        p = s.sampling
        return p is not None and p.greedy and p.logprobs is None and not s.banned

    def _sample(self, msg: Step, result: StepResult) -> None:
        for seq_id in msg.finished:
            self.generators.pop(seq_id, None)
        rows = [s for s in msg.seqs if s.sampling is not None and s.seq_id not in result.sampled]
        if not rows:
            return
        for s in rows:
            if s.seq_id not in self.generators:
                seed = s.sampling.seed
                if self.deterministic and seed is None:
                    seed = self.config.seed  # a request's draws must not depend on the others'
                self.generators[s.seq_id] = make_generator(seed)
        if self.deterministic:
            # One row at a time: no op of the sampler sees how many rows there are.
            for s in rows:
                one = self.sampler(result.logits[s.seq_id][None], [s.sampling], [self.generators[s.seq_id]], [s.banned])
                result.sampled[s.seq_id] = Sampled(one.token_ids[0], one.logprobs[0], one.top_logprobs[0])
            result.logits = {}
            return
        logits = torch.stack([result.logits[s.seq_id] for s in rows])  # [B, V]
        out = self.sampler(
            logits, [s.sampling for s in rows], [self.generators[s.seq_id] for s in rows], [s.banned for s in rows]
        )
        # (added to the rows a static step sampled on the device, not replacing them)
        result.sampled.update(
            {s.seq_id: Sampled(out.token_ids[i], out.logprobs[i], out.top_logprobs[i]) for i, s in enumerate(rows)}
        )
        result.logits = {}

    def _prefill_outputs(self, plan: StepPlan, hidden: Tensor, result: StepResult) -> None:
        """Logits of each chunk's last token, where it lives; prompt logprobs of local rows."""
        row = 0
        for s, pos in plan.prefill_rows:
            h = hidden[row : row + len(pos)]
            row += len(pos)
            end = s.start + len(s.token_ids)
            if s.logits and len(pos) and int(pos[-1]) == end - 1:
                result.logits[s.seq_id] = self._logits(h[-1:])[0].cpu()
            if s.prompt_logprobs is not None:
                keep = (pos < s.num_prompt_tokens - 1).nonzero().flatten()  # row at p predicts token p + 1
                nxt = s.token_ids[1:] + [s.next_token if s.next_token is not None else -1]
                targets = [nxt[p - s.start] for p in pos[keep].tolist()]
                entries = prompt_logprobs_rows(self._logits, h[keep.to(h.device)], targets, s.prompt_logprobs)
                result.prompt_logprobs[s.seq_id] = {p + 1: e for p, e in zip(pos[keep].tolist(), entries)}

    def _gather(self, result: StepResult) -> StepResult:
        """Collect every rank's partial result on rank 0 (others get theirs back)."""
        result.comm_bytes = [STATS.total]
        mine = result if self.reports else None
        world, me = dist.get_world_size(), dist.get_rank()
        if world == 1:  # nothing to collect
            STATS.reset()
            return result
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
        merged = StepResult()
        for part in parts:
            if part is None:
                continue
            for s, logits in part.logits.items():
                # decode: SP ranks report vocabulary slices in rank order; prefill: one rank each
                merged.logits[s] = torch.cat([merged.logits[s], logits]) if s in merged.logits else logits
            for s, entries in part.prompt_logprobs.items():
                merged.prompt_logprobs.setdefault(s, {}).update(entries)
            for s, tops in part.tops.items():  # in rank order, as the slices
                merged.tops.setdefault(s, []).extend(tops)
            merged.comm_bytes += part.comm_bytes
        return merged

    def execute(self, msg: Step) -> StepResult:
        if isinstance(msg, KVLoad) and self.kv_store is not None:
            return KVLoadResult(self.kv_store.load(self.cache, msg))
        if not isinstance(msg, Step):
            raise TypeError(f"unknown engine message {type(msg).__name__}")
        if self.kv_store is None:
            return self.step(msg)
        self.kv_store.idle.clear()  # the store's writer waits for the step to end
        try:
            result = self.step(msg)
        finally:
            self.kv_store.idle.set()
        if msg.kv_save or msg.kv_drop:  # the blocks' K/V copied now, written in the background
            self.kv_store.save(self.cache, msg.kv_save, msg.kv_drop)
        return result
