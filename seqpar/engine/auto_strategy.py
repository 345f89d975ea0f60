"""`strategy="auto"`: each step's prefill strategy, the cheapest by the measured cost model.

The driver knows every rank's share of a step from the scheduled sequences and the placement
alone, so it predicts each strategy's step time (`seqpar.costmodel.step_cost`) from the machine
profile (`seqpar tune`, or the built-in one) and picks the cheapest. The same profile and the
same step always give the same choice.
"""

from __future__ import annotations

import logging

from seqpar.costmodel.profile import MachineProfile
from seqpar.costmodel.step_cost import SeqWork, StepCost, StepWork, predict_step
from seqpar.engine.config import EngineConfig
from seqpar.engine.placement import Placement
from seqpar.engine.scheduler import ScheduledSeq
from seqpar.kernels.layout import Run
from seqpar.model.config import ModelConfig
from seqpar.strategies.over_cache import SLICE_PACK_MAX, kv_exchange_bytes, slot_ranges

log = logging.getLogger(__name__)


def _joined(stretches: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Adjacent stretches as one run: the kernels take consecutive positions in one call."""
    runs: list[tuple[int, int]] = []
    for p, n in stretches:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((p, n))
    return tuple(runs)


def step_work(
    placement: Placement,
    spans: list[tuple[int, int]],
    decode_rows: int,
    dtype_bytes: int,
    blocks: list[list[int]] | None = None,
    kv_exchange_bytes: int = 0,
) -> StepWork:
    """The work of a step whose prefill sequences compute positions [start, end) each; `blocks`:
    their block tables, which say where the keys lie in each rank's storage."""
    seqs = []
    stored_runs: list[list[Run]] = [[] for _ in range(placement.sp_size)]  # each rank's, as StepPlan lists them
    for j, (start, end) in enumerate(spans):
        stored = None
        if blocks is not None:
            runs = placement.key_runs(blocks[j], end, j)
            stored = tuple(tuple((r.pos, r.length) for r in rank_runs) for rank_runs in runs)
            for r, rank_runs in enumerate(runs):
                stored_runs[r].extend(rank_runs)
        seqs.append(
            SeqWork(
                tuple(_joined(r) for r in placement.token_runs(start, end)),
                tuple(_joined(r) for r in placement.token_runs(0, end)),
                stored,
            )
        )
    packs = max(len(slot_ranges(r)) for r in stored_runs) > SLICE_PACK_MAX  # as attention_over_cache decides
    return StepWork(placement.sp_size, tuple(seqs), decode_rows, dtype_bytes, packs, kv_exchange_bytes)


class AutoStrategy:
    def __init__(self, config: EngineConfig, mc: ModelConfig, profile: MachineProfile, num_blocks: int) -> None:
        self.placement = config.placement()
        self.mc = mc
        self.profile = profile
        self.threads = config.threads_per_rank
        self.dtype_bytes = config.torch_dtype.itemsize
        # The ranks' shared-memory buffer for pass-KV, as the workers size it (ranks that turn out
        # to span hosts use the process group instead: then the prediction is optimistic).
        self.kv_exchange_bytes = 0
        if config.shared_memory and config.device == "cpu" and config.sp_size > 1:
            kv_heads = max(1, mc.num_kv_heads // config.tp_size)
            cache_tokens = num_blocks * config.block_size
            self.kv_exchange_bytes = kv_exchange_bytes(cache_tokens, kv_heads, mc.head_dim, self.dtype_bytes)

    def predict(
        self, spans: list[tuple[int, int]], decode_rows: int = 0, blocks: list[list[int]] | None = None
    ) -> StepCost:
        work = step_work(self.placement, spans, decode_rows, self.dtype_bytes, blocks, self.kv_exchange_bytes)
        return predict_step(work, self.mc, self.profile, self.threads)

    def choose(self, scheduled: list[ScheduledSeq]) -> tuple[str, StepCost | None]:
        """The cheapest strategy for this step, and the prediction it came from (None: decode only)."""
        prefill = [s for s in scheduled if not s.decode]
        if not prefill:
            return "ring", None  # a decode-only step runs no prefill strategy
        spans = [(s.start, s.start + s.num_new) for s in prefill]
        cost = self.predict(spans, len(scheduled) - len(prefill), [s.seq.blocks[0] for s in prefill])
        choice = cost.best()
        if log.isEnabledFor(logging.DEBUG):
            new = sum(b - a for a, b in spans)
            times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in cost.seconds.items())
            log.debug(
                "auto strategy: %s for %d new tokens over %d cached (predicted %s)",
                choice,
                new,
                sum(a for a, _ in spans),
                times,
            )
        return choice, cost
