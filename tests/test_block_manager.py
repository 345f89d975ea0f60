"""The driver's KV books without ranks: placement, block manager, scheduler."""

from __future__ import annotations

import heapq

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_util import check_books
from seqpar.engine.admission import PromptRefused, check_prompt
from seqpar.engine.block_manager import BlockManager, chain_hash
from seqpar.engine.config import EngineConfig
from seqpar.engine.kv_cache import KVCache, KVGroups, size_cache
from seqpar.engine.placement import SHARD_SCHEMES, Placement, blocks_needed
from seqpar.engine.sampling_params import SamplingParams
from seqpar.engine.scheduler import Scheduler, SchedulerConfig
from seqpar.engine.sequence import Sequence, SequenceStatus


# ---------------------------------------------------------------- placement
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("scheme", SHARD_SCHEMES)
def test_placement_depends_only_on_position(world, scheme):
    pl = Placement(world, block_size=4, shard_blocks=2, scheme=scheme)
    owners = [pl.owner(i) for i in range(8 * world)]
    units = owners[::2]
    assert owners == [u for u in units for _ in range(2)]  # whole shard units
    if scheme == "snake":
        assert units[: 2 * world] == list(range(world)) + list(reversed(range(world)))
    else:
        assert units[:world] == list(range(world))
    # token_runs covers [start, stop) exactly once, each stretch on the owner of its blocks
    for start, stop in [(0, 1), (3, 29), (5, 70), (16, 17)]:
        seen = []
        for r, stretches in enumerate(pl.token_runs(start, stop)):
            for p, n in stretches:
                assert all(pl.owner(q // 4) == r for q in range(p, p + n))
                seen += range(p, p + n)
        assert sorted(seen) == list(range(start, stop))


def test_snake_units_balance_causal_work():
    """The snake over units gives each rank near-equal causal work once a prompt spans 2W units."""
    for world in (2, 3, 4):
        pl = Placement(world, block_size=16, shard_blocks=16)
        length = 2 * world * pl.unit_tokens * 2
        work = [0] * world
        for r, stretches in enumerate(pl.token_runs(0, length)):
            work[r] = sum(p + 1 for s, n in stretches for p in range(s, s + n))
        assert max(work) / min(work) < 1.0 + 1e-9


def test_capacity_grows_with_sp():
    one = Placement(1, 16, 16).max_tokens(100)
    assert one == 1600
    for world in (2, 3, 4):
        assert Placement(world, 16, 16).max_tokens(100) >= 0.95 * world * one


def test_cache_sizing_and_write():
    per_block = 2 * 3 * 16 * 2 * 8 * 4  # K+V fp32, 3 layers, 2 kv heads, D 8, 16 tokens
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert size_cache(3, 2, 8, torch.float32, 10 * per_block + 7, 16) == 10
    with pytest.raises(ValueError, match="kv_cache_gb=0.1 gives"):
        size_cache(3, 2, 8, torch.float32, per_block - 1, 16, what="kv_cache_gb=0.1")
    cache = KVCache(3, 10, 16, 2, 8)
    k = torch.randn(5, 2, 8)
    slots = torch.tensor([3, 40, 41, 7, 100])
    cache.write(1, slots, k, -k)
    kh, vh = cache.storage(1)
    torch.testing.assert_close(kh[:, slots].transpose(0, 1), k, rtol=0, atol=0)
    torch.testing.assert_close(vh[:, slots].transpose(0, 1), -k, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[n, Hkv, D\]"):
        cache.write(0, slots, torch.zeros(5, 3, 8), torch.zeros(5, 3, 8))


# ---------------------------------------------------------------- block manager
def _seq(sid: int, tokens: list[int], **params) -> Sequence:
    return Sequence(sid, tokens, SamplingParams(**params))


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["alloc", "compute", "free"]), st.integers(0, 5), st.integers(1, 30)), max_size=60
    ),
    num_blocks=st.integers(1, 10),
    world=st.integers(1, 3),
    prefix=st.booleans(),
    windows=st.sampled_from([[None], [None, 3, 3], [4, 4]]),  # one group; global + window; windows alone
)
def test_books_balance_under_any_sequence_of_operations(ops, num_blocks, world, prefix, windows):
    bm = BlockManager(Placement(world, 2, 1), num_blocks, prefix, groups=KVGroups.of(windows))
    seqs: dict[int, Sequence] = {}
    for op, sid, n in ops:
        if op == "alloc":
            seq = seqs.get(sid)
            if seq is None:  # prompts share a prefix, so hits happen
                seq = seqs[sid] = _seq(sid, [1, 2, 3, 4, 5, 6, 7, 8][: n % 9 or 1] + [sid] * n)
                seq.num_computed_tokens = bm.match_prefix(seq)
            before = [p.available() for p in bm.pools]
            want = min(seq.num_tokens, seq.num_computed_tokens + n)
            if not bm.allocate(seq, want):
                assert [p.available() for p in bm.pools] == before  # all or nothing
        elif op == "compute" and sid in seqs:
            seq = seqs[sid]
            seq.num_computed_tokens = min(len(seq.blocks[0]) * 2 if seq.blocks else 0, seq.num_tokens)
            bm.cache_full_blocks(seq)
        elif op == "free" and sid in seqs:
            bm.free(seqs.pop(sid))
        check_books(bm, list(seqs.values()))
    for seq in seqs.values():
        bm.free(seq)
    check_books(bm, [])
    assert all(p.available() == num_blocks for p in bm.pools)


def test_window_groups_hold_only_their_window_and_a_prefix_needs_only_the_last_window():
    """Layers [global, window 6, window 6] in groups of one, blocks of 2 tokens, on 2 ranks: a window
    group frees what left its window as the sequence advances; a prefix hit needs every global block
    but only the window's blocks before the hit; where those are gone, the hit is shorter."""
    groups = KVGroups.of([None, 6, 6])
    assert groups.layers == ((0,), (1,), (2,)) and groups.windows == (None, 6, 6) and groups.size == 1
    bm = BlockManager(Placement(2, 2, 1), num_blocks=40, groups=groups)
    doc = list(range(100, 130))  # 30 tokens: 15 blocks
    a = _seq(0, doc + [1])
    assert bm.match_prefix(a) == 0
    for end in (8, 16, 24, 31):  # chunks of 8
        assert bm.allocate(a, end)
        a.num_computed_tokens = end
        bm.cache_full_blocks(a)
        # the next query is at `end`: it sees positions > end - 6, from block (end - 5) // 2 on
        first = (end - 5) // 2
        for table in a.blocks[1:]:
            assert all(b < 0 for b in table[:first]) and all(b >= 0 for b in table[first:])
        assert all(b >= 0 for b in a.blocks[0])
    assert sum(bm.held(a)) == 16 + 2 * (16 - 13)  # every block of the global group, 3 of each window group
    check_books(bm, [a])
    bm.free(a)
    check_books(bm, [])
    b = _seq(1, doc + [2])  # the whole document is a hit: the window groups' last blocks are still cached
    assert bm.match_prefix(b) == 30
    assert [sum(b >= 0 for b in t) for t in b.blocks] == [15, 3, 3]  # positions 25..29 seen by query 30
    check_books(bm, [b])
    bm.free(b)
    # forget the window groups' blocks 12..14 (a late part of the document, still held by its global group)
    for i in (12, 13, 14):
        for g in (1, 2):
            pool = bm.pools[bm.placement.owner(i)]
            page = pool.by_hash.pop(groups.key(b_hash(doc, i), g))
            del pool.hash_of[page]
            pool.cached.pop(page)
            heapq.heappush(pool.free, page)
    c = _seq(2, doc + [3])
    # a prefix of n blocks needs the window groups' blocks (2n - 5) // 2 .. n - 1: the longest with
    # none of 12..14 among them is n = 12
    assert bm.match_prefix(c) == 24
    assert [sum(b >= 0 for b in t) for t in c.blocks] == [12, 3, 3]
    check_books(bm, [c])


def b_hash(tokens: list[int], i: int) -> bytes:
    """The chained hash of block i (blocks of 2 tokens)."""
    h = None
    for j in range(i + 1):
        h = chain_hash(h, tokens[2 * j : 2 * j + 2])
    return h


def test_prefix_reuse_across_ranks_and_lru_eviction():
    bm = BlockManager(Placement(2, 4, 1), num_blocks=4)
    doc = list(range(100, 118))  # 18 tokens: 4 full blocks and a partial one
    a = _seq(0, doc + [1, 2])
    assert bm.match_prefix(a) == 0 and bm.allocate(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    bm.cache_full_blocks(a)
    assert len(a.block_hashes) == 5
    bm.free(a)
    b = _seq(1, doc + [9])  # same document, another question: 4 blocks (16 tokens) reused on both ranks
    assert bm.match_prefix(b) == 16 and [bm.placement.owner(i) for i in range(4)] == [0, 1, 1, 0]
    c = _seq(2, doc[:6])  # a prefix ending mid-block reuses its full blocks only
    assert bm.match_prefix(c) == 4
    assert bm.prefix_queries == 20 + 19 + 6 and bm.prefix_hits == 16 + 4
    bm.free(b)
    bm.free(c)
    check_books(bm, [])
    d = _seq(3, list(range(500, 532)))  # needs all 8 blocks: every cached one is evicted, LRU first
    assert bm.match_prefix(d) == 0 and bm.allocate(d, 32)
    assert all(not p.by_hash for p in bm.pools)
    bm.free(d)
    e = _seq(4, doc + [3], prompt_logprobs=1)  # prompt logprobs need every position computed
    assert bm.match_prefix(e) == 0


# ---------------------------------------------------------------- scheduler
def _sched(num_blocks=64, budget=8, world=1, max_seqs=4, threshold=4) -> Scheduler:
    bm = BlockManager(Placement(world, 2, 1), num_blocks)
    config = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, long_prefill_token_threshold=threshold
    )
    return Scheduler(config, bm)


def _run(sched: Scheduler) -> list[tuple[int, int, int, bool]]:
    """One step, as the engine does it, sampling token 7 for every sequence that reached its end."""
    out = sched.schedule()
    sched.update(out)
    for s in out:
        if s.wants_logits:
            s.seq.output_token_ids.append(7)
    return [(s.seq.seq_id, s.start, s.num_new, s.decode) for s in out]


def test_chunked_prefill_mixes_with_decodes_and_short_prompts_get_through():
    sched = _sched(budget=8, threshold=4)
    long, short = _seq(0, list(range(1, 21))), _seq(1, [5, 6])
    sched.add(long)
    sched.add(short)
    assert _run(sched) == [(0, 0, 4, False), (1, 0, 2, False)]  # long capped while short waits
    assert _run(sched) == [(1, 2, 1, True), (0, 4, 7, False)]  # a decode beside a prefill chunk, first
    assert _run(sched) == [(1, 3, 1, True), (0, 11, 7, False)]
    assert _run(sched) == [(1, 4, 1, True), (0, 18, 2, False)]
    assert _run(sched) == [(0, 20, 1, True), (1, 5, 1, True)]
    sched.finish(long)
    sched.finish(short)
    check_books(sched.blocks, [])


def test_preemption_frees_the_newest_and_recomputes_it():
    sched = _sched(num_blocks=6, budget=16, threshold=16)
    a, b = _seq(0, list(range(1, 7))), _seq(1, list(range(11, 17)))
    sched.add(a)
    sched.add(b)
    assert _run(sched) == [(0, 0, 6, False), (1, 0, 6, False)]  # 3 + 3 blocks
    assert _run(sched) == [(0, 6, 1, True)]  # a needs a 4th block: b (newest) is preempted
    assert sched.num_preemptions == 1 and b.status is SequenceStatus.WAITING and not b.blocks
    sched.finish(a)
    # b comes back and recomputes its prompt and its sampled token: its first two blocks are
    # prefix hits, its third was evicted (LRU, a prefix's tail first) to give a its 4th
    assert _run(sched) == [(1, 4, 3, False)]
    assert b.num_cached_tokens == 0  # counted at its first admission
    sched.finish(b)
    check_books(sched.blocks, [])


def test_requests_that_can_never_fit_are_refused_at_once():
    sched = _sched()
    with pytest.raises(PromptRefused, match="context length is 48 tokens.*the prompt has 48 tokens"):
        check_prompt([1] * 48, 100, 48)  # LLMEngine.add_request and the server call it before queueing
    with pytest.raises(ValueError, match="no tokens"):
        _seq(1, [])
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    r = _seq(2, [1, 2])
    sched.add(r)
    sched.finish(r)
    assert r.status is SequenceStatus.FINISHED and not sched.has_unfinished()


def test_the_snake_scheme_keeps_its_old_name_as_an_alias():
    # "zigzag" named the engine's snake placement before it was told apart from ShardPlan's zigzag
    assert EngineConfig(scheme="zigzag").scheme == "snake"
    assert EngineConfig(scheme="zigzag").placement() == EngineConfig().placement()
    from seqpar.cli.main import build_parser

    assert build_parser().parse_args(["generate", "--prompt", "x", "--scheme", "zigzag"]).scheme == "zigzag"
    with pytest.raises(ValueError, match="choose one of snake, striped"):
        Placement(2, 4, scheme="zigzag")
