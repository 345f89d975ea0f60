"""Serving features are exact: prefix caching across SP ranks, chunked prefill, preemption.

Every request must come out as it does when run alone on one rank with neither prefix
caching nor chunking: the same greedy tokens, and log-probs within 1e-4 (fp32; the
chunks, cached blocks and merges only reorder the same sums, which moves log-probs of
this 2-layer model by ~1e-6; a wrong mask, position or block moves them by >1e-2).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine_util import check_books
from seqpar import LLM, SamplingParams
from seqpar.engine.kv_cache import kv_groups
from seqpar.model import load_config
from test_engine import _save

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
_rng = random.Random(7)
DOC = [_rng.randrange(3, 100) for _ in range(30)]  # a document asked about twice
OTHER = [_rng.randrange(3, 100) for _ in range(21)]
FIRST = [DOC + [11, 12]]
# A second question about DOC, a prefix of DOC ending mid-block, and two requests sharing a
# prefix nobody cached yet, in the same step.
THEN = [DOC + [13], DOC[:14], OTHER + [21], OTHER + [22, 23]]
BS = 4  # tokens per KV block; one block per shard unit, so the document spreads over every rank


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _save(Path(tmp_path_factory.mktemp("core")), "llama")[1]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """Layers [window 5, global, window 5]: the cache frees a window layer's blocks as it goes."""
    from test_gemma3 import GEMMA3

    return _save(Path(tmp_path_factory.mktemp("core-gemma3")), "gemma3", **GEMMA3)[1]


_ALONE: dict[str, list] = {}


def _alone(model: str) -> list:
    """Each request on its own, one rank, no prefix caching, no chunking."""
    if model not in _ALONE:
        with LLM(model=model, block_size=BS, enable_prefix_caching=False) as llm:
            _ALONE[model] = [llm.generate([p], PARAMS)[0] for p in FIRST + THEN]
    return _ALONE[model]


def _same(outs, refs) -> None:
    for out, ref in zip(outs, refs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for got, want in zip(out.outputs[0].logprobs, ref.outputs[0].logprobs, strict=True):
            ((tid, lp),) = [(t, v) for t, v in got.items()]
            assert abs(lp.logprob - want[tid].logprob) <= 1e-4


def _blocks(model: str, n: int) -> float:
    """kv_cache_gb that gives exactly n blocks per rank (half a block of slack)."""
    mc = load_config(model)
    return (n + 0.5) * 2 * kv_groups(mc).size * mc.num_kv_heads * mc.head_dim * 4 * BS / 2**30


# (model, sp, budget, strategy, blocks per rank): budgets smaller than a block (2, 3), than a
# shard of the prompt, than the prompt, and none; tiny caches force eviction and preemption (for
# Gemma 3's window layers too: blocks of three groups, one layer each).
CASES = [
    ("model", 1, 2048, "ring", None),
    ("model", 2, 3, "pass_q", None),
    ("model", 3, 9, "ring", None),
    ("model", 4, 2, "allgather", None),
    ("model", 2, 2048, "ring", 12),
    ("gemma3", 3, 5, "pass_q", 12),
]


@pytest.mark.parametrize("fixture, sp, budget, strategy, blocks", CASES)
def test_prefix_caching_chunking_preemption_are_exact(request, fixture, sp, budget, strategy, blocks):
    model = request.getfixturevalue(fixture)
    alone = _alone(model)
    kv = {} if blocks is None else {"kv_cache_gb": _blocks(model, blocks)}
    with LLM(
        model=model, sp_size=sp, block_size=BS, shard_blocks=1, strategy=strategy, max_num_batched_tokens=budget, **kv
    ) as llm:
        eng = llm.engine
        if blocks is not None:
            assert eng.num_blocks == blocks
        first = llm.generate(FIRST, PARAMS)
        then = llm.generate(THEN, PARAMS)
        _same(first + then, alone)
        check_books(eng.blocks, [])  # every reference dropped, every block in one state
        assert eng.blocks.usage() == [0.0] * sp
        stats = eng.stats()
        if blocks is None:
            # 7 full blocks of DOC (28 tokens) reused for the second question; 3 (12) for the
            # mid-block prefix; nothing for sharers admitted in the same step (a small budget
            # admits the second sharer a step later, when the first's blocks are cached).
            cached = [o.num_cached_tokens for o in then]
            assert cached[:2] == [28, 12] and (budget < 100 or cached[2:] == [0, 0])
            assert stats.prefix_cache_hits == sum(cached) and stats.num_preemptions == 0
        else:
            assert stats.num_preemptions > 0  # 4 requests at once do not fit: some were recomputed
        # After everything: the document again, evicted or not, still exact.
        _same(llm.generate([THEN[0]], PARAMS), [alone[1]])


def test_prefix_caching_off_and_capacity_grows_with_sp(model):
    kv = _blocks(model, 16)
    # The same kv_cache_gb per rank: SP 2 serves a prompt SP 1 refuses.
    with LLM(model=model, block_size=BS, shard_blocks=1, kv_cache_gb=kv, enable_prefix_caching=False) as one:
        out = one.generate(FIRST + FIRST, PARAMS)
        assert [o.num_cached_tokens for o in out] == [0, 0] and one.engine.stats().prefix_cache_queries == 0
        cap1 = one.engine.max_model_len
        with pytest.raises(ValueError, match="holds at most"):
            one.generate([DOC * 3], PARAMS)
    with LLM(model=model, sp_size=2, block_size=BS, shard_blocks=1, kv_cache_gb=kv) as two:
        assert two.engine.max_model_len >= 2 * cap1 * 0.95
        assert len(two.generate([DOC * 3], PARAMS)[0].outputs[0].token_ids) == 6
