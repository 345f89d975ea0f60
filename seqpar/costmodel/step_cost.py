"""Predicted time of one engine step under each prefill strategy, from a machine profile.

A step's prefill work is, per sequence, the new positions each SP rank owns (its queries) and the
positions [0, end) each rank holds in its cache (its keys, cached and new alike: a rank writes its
new K/V before attending). Per layer (every layer is the same), with Hq, Hkv, D the heads and head
dim, b the K/V element bytes and F = 4 D Hq FLOPs per visible query-key pair (QK^T and PV), as
each engine strategy prices it in its own module (`Cost.step_s`; this module works out the kernel
times, copies and links it is given, `StepLayer`):

- ring (pass-KV): W steps; at step s rank r attends its queries over rank (r - s)'s keys while the
  block it holds, 2 Hkv D b bytes per key, travels on (steps 0 .. W-2). The ranks move in lockstep,
  so a step costs the larger of the slowest rank's compute and the slowest transfer when the
  transfer hides fully; the profile's measured `overlap` says how much of it does. Ranks on one
  host publish their block once in shared memory instead (`kv_exchange_bytes`, the `shm` link)
  and each then attends over all W blocks at its own pace; pass-Q likewise publishes its queries
  once and its partials once.
- pass_q: W steps; at step s rank r attends rank (r - s)'s queries over its own keys while that
  query block (Hq D b bytes per query) travels on; then one all-to-all returns the partials
  (Hq (D + 1) fp32 per query) home and each rank merges its W partials.
- allgather: one all-gather of every rank's packed K/V (padded to the largest part), then each
  rank attends its queries over all keys.

Compute of a (query run, key run) pair of one sequence: the pairs whose key precedes the query
run's first position are a dense block at the unmasked kernel's rate for that many query rows; the
square on the diagonal (positions both runs share) at the causal kernel's rate for its side; each
pair is one kernel call, which costs the profile's `call_s` besides. Pass-Q reads its keys in place,
one call per stretch of adjacent blocks in storage (`SeqWork.stored`); past `SLICE_PACK_MAX`
stretches on a rank it packs them first, as the others do (`StepWork.pass_q_packs`). The
linear layers and everything else outside attention (`linear`, measured as the model's layers with
attention stubbed out) cost the same under every strategy; they set the absolute time, not the
choice. Byte counts are exactly those the counted collectives record (`formulas`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from seqpar.costmodel import formulas as f
from seqpar.costmodel.profile import MachineProfile
from seqpar.model.config import ModelConfig
from seqpar.strategies.pricing import StepLayer
from seqpar.strategies.registry import costs, over_cache_names

Runs = tuple[tuple[int, int], ...]  # (first position, length), ascending, disjoint


@dataclass(frozen=True)
class SeqWork:
    """One prefill sequence of a step: per SP rank, the new positions it owns and the keys it holds.

    stored: the keys again, cut where consecutive positions sit apart in the paged storage (pass-Q
    reads them in place, one kernel call per stretch; the others pack them first). None: unbroken.
    """

    queries: tuple[Runs, ...]
    keys: tuple[Runs, ...]
    stored: tuple[Runs, ...] | None = None


@dataclass(frozen=True)
class StepWork:
    world: int
    prefill: tuple[SeqWork, ...]
    decode_rows: int = 0  # decode rows ride in the same step, on every rank alike
    dtype_bytes: int = 4
    pass_q_packs: bool = False  # keys too scattered in storage: pass-Q packs them first, as ring does
    kv_exchange_bytes: int = 0  # pass-KV messages up to this size go through shared memory (0: none)
    window: int | None = None  # a sliding-window layer's work (`within`): a query sees its last `window` keys

    def query_counts(self) -> list[int]:
        return [sum(n for s in self.prefill for _, n in s.queries[r]) for r in range(self.world)]

    def key_counts(self) -> list[int]:
        return [sum(n for s in self.prefill for _, n in s.keys[r]) for r in range(self.world)]

    def within(self, window: int) -> StepWork:
        """The work of a sliding-window layer: each sequence's keys cut to those some query of the step
        can see (what the engine's window layers attend and send; `StepPlan.keys_within`)."""
        seqs = []
        for s in self.prefill:
            reach = [(a - window + 1, a + n) for runs in s.queries for a, n in runs]
            lo, hi = min((a for a, _ in reach), default=0), max((b for _, b in reach), default=0)

            def cut(runs: Runs, lo: int = lo, hi: int = hi) -> Runs:
                return tuple((max(a, lo), min(a + n, hi) - max(a, lo)) for a, n in runs if min(a + n, hi) > max(a, lo))

            stored = None if s.stored is None else tuple(cut(r) for r in s.stored)
            seqs.append(SeqWork(s.queries, tuple(cut(r) for r in s.keys), stored))
        return replace(self, prefill=tuple(seqs), window=window)


def engine_strategies() -> tuple[str, ...]:
    """What `auto` chooses among: every strategy the engine runs over its cache, each pricing its
    step (`Cost.step_s`, in its own module), in the order ties go by (`Cost.tie_rank`)."""
    priced = costs()
    missing = [n for n in over_cache_names() if n not in priced or priced[n].step_s is None]
    if missing:
        raise RuntimeError(f"strategies {', '.join(missing)} run over the cache but declare no step cost (Cost.step_s)")
    return tuple(sorted(over_cache_names(), key=lambda n: (priced[n].tie_rank, n)))


def step_bytes(strategy: str, work: StepWork, mc: ModelConfig, rank: int) -> int:
    """Bytes `rank` sends in this step's prefill attention, all layers (the formulas' counts; a sliding
    window layer's over the keys some query of the step can see: at most what the engine sends)."""
    layers, total = [mc.window(i) for i in range(mc.num_layers)], 0
    for window in set(layers):  # one layer of each kind, times its layers
        lw = work if window is None else work.within(window)
        counts = lw.query_counts() if costs()[strategy].counts == "queries" else lw.key_counts()
        per_layer = f.attention_bytes(
            strategy, counts, rank, mc.num_heads, mc.num_kv_heads, mc.head_dim, lw.dtype_bytes
        )
        total += layers.count(window) * per_layer
    return total


def _pair_seconds(
    q: tuple[int, int], k: tuple[int, int], profile: MachineProfile, threads: int, flop: int, window: int | None = None
) -> float:
    """Kernel time of query run q over key run k of one sequence (causal by position; a window's pairs
    at the unmasked kernel's rate, as its tiles run under a mask)."""
    a, n = q
    b, m = k
    if b > a + n - 1:  # every key after every query
        return 0.0
    if window is not None:  # row p sees keys [max(b, p - window + 1), min(b + m, p + 1))
        pairs = sum(max(0, min(b + m, p + 1) - max(b, p - window + 1)) for p in range(a, a + n))
        return pairs * flop / profile.rate("attention_full", n, threads) + profile.call_s if pairs else 0.0
    # rows p in [a, a + n) see keys [b, min(b + m, p + 1)): the keys before the run are seen by
    # every row; the positions both runs hold form the causal square; rows past the square's end
    # see all of it.
    before = max(0, min(b + m, a) - b)
    lo = max(a, b)
    side = max(0, min(a + n, b + m) - lo)
    full = n * before + (side * (a + n - lo - side) if side else 0)
    seconds = 0.0
    if full:
        seconds += full * flop / profile.rate("attention_full", n, threads)
    if side:
        seconds += side * (side + 1) // 2 * flop / profile.rate("attention_causal", side, threads)
    return seconds + profile.call_s if seconds else 0.0


def _attention_seconds(
    seqs: Sequence[SeqWork],
    q_rank: int,
    k_rank: int,
    profile: MachineProfile,
    threads: int,
    flop: int,
    in_place: bool = False,
    window: int | None = None,
) -> float:
    """One layer's kernel time of rank q_rank's queries over rank k_rank's keys (in_place: read
    from the paged storage, stretch by stretch)."""
    total = 0.0
    for s in seqs:
        keys = s.stored if in_place and s.stored is not None else s.keys
        for q in s.queries[q_rank]:
            for k in keys[k_rank]:
                total += _pair_seconds(q, k, profile, threads, flop, window)
    return total


@dataclass(frozen=True)
class StepCost:
    """Predicted seconds of a step under each strategy, and its parts."""

    seconds: dict[str, float]  # strategy -> the whole step
    linear_s: float  # the same under every strategy
    attention_s: dict[str, float]  # strategy -> attention incl. communication, all layers

    def best(self) -> str:
        # ties (W = 1, an empty step) go to the first in `engine_strategies` order: deterministic
        order = list(self.seconds)
        return min(order, key=lambda s: (self.seconds[s], order.index(s)))


def predict_step(work: StepWork, mc: ModelConfig, profile: MachineProfile, threads: int) -> StepCost:
    w, layers = work.world, [mc.window(i) for i in range(mc.num_layers)]
    rate = profile.rate
    names = engine_strategies()
    priced = costs()
    # one layer of each kind (global, each window size), priced by every strategy; times its layers
    attention = dict.fromkeys(names, 0.0)
    for window in set(layers):
        frame = _frame(work if window is None else work.within(window), mc, profile, threads)
        for s in names:
            attention[s] += layers.count(window) * priced[s].step_s(frame)
    qc = work.query_counts()
    rows = [qc[r] + work.decode_rows for r in range(w)]
    linear = max(f.linear_flops(mc, n) / rate("linear", n, threads) if n else 0.0 for n in rows)
    logits = f.linear_flops(mc, 0, logit_rows=len(work.prefill) + work.decode_rows) / w
    linear += logits / rate("gemm", max(1, len(work.prefill) + work.decode_rows), threads)
    return StepCost({s: linear + attention[s] for s in names}, linear, attention)


def _frame(work: StepWork, mc: ModelConfig, profile: MachineProfile, threads: int) -> StepLayer:
    """What one layer's strategies are priced from: kernel times, counts, links."""
    w, rate, flop = work.world, profile.rate, 4 * mc.head_dim * mc.num_heads

    def copy_s(nbytes: float) -> float:
        return nbytes / rate("copy", max(nbytes, 1.0), threads) if nbytes else 0.0

    def kernel(r: int, j: int, in_place: bool = False) -> float:
        return _attention_seconds(work.prefill, r, j, profile, threads, flop, in_place, work.window)

    return StepLayer(
        world=w,
        hq=mc.num_heads,
        hkv=mc.num_kv_heads,
        d=mc.head_dim,
        b=work.dtype_bytes,
        query_counts=work.query_counts(),
        key_counts=work.key_counts(),
        # comp[r][j]: rank r's queries over rank j's keys, one layer; comp_in_place: the same over keys
        # read where they lie in storage (pass-Q), unless too scattered to
        comp=[[kernel(r, j) for j in range(w)] for r in range(w)],
        comp_in_place=[[kernel(r, j, not work.pass_q_packs) for j in range(w)] for r in range(w)],
        packs_keys=work.pass_q_packs,
        kv_exchange_bytes=work.kv_exchange_bytes,
        links=profile.links,
        copy_s=copy_s,
        overlap=profile.overlap,
    )
