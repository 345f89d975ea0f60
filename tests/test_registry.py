"""The strategy registry: each strategy declared once feeds the library, the engine's config and
CLI, the benchmarks and the cost model; a new strategy is one module (here, a test-only toy)."""

from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.costmodel import formulas, step_cost
from seqpar.engine.config import PREFILL_STRATEGIES, EngineConfig
from seqpar.kernels.attention import reference_attention
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies import registry
from seqpar.strategies.allgather import allgather_attention
from seqpar.strategies.api import sp_attention


def test_the_registry_feeds_every_list():
    engine = registry.over_cache_names()
    assert set(engine) == {"ring", "pass_q", "allgather"}
    assert PREFILL_STRATEGIES == (*engine, "auto")
    assert seqpar.STRATEGIES == registry.whole_prompt_names()
    assert {"ulysses", "usp"} <= set(registry.whole_prompt_names())
    from seqpar.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--strategy", "pass_q"])
    assert args.strategy == "pass_q"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--strategy", "ulysses"])


def test_the_cost_model_prices_every_engine_strategy():
    # auto picks among what the cost model prices: a new engine strategy needs its cost there too
    assert set(step_cost.STRATEGIES) == set(registry.over_cache_names())
    for name in registry.over_cache_names():
        assert formulas.attention_bytes(name, [5, 7], 0, 4, 2, 8, 4) > 0


@pytest.mark.parametrize(
    "strategy, where",
    [("ulysses", "seqpar.sp_attention(..., strategy='ulysses')"), ("head_sharded", "seqpar.head_sharded_attention")],
)
def test_a_whole_prompt_strategy_in_the_engine_says_where_it_runs(strategy, where):
    with pytest.raises(ValueError, match="attends whole prompts") as e:
        EngineConfig(strategy=strategy)
    assert where in str(e.value)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="choose one of .*ring"):
        registry.get("nope")
    with pytest.raises(ValueError, match=r"over a KV cache; choose one of .*\(.ulysses. runs as seqpar.sp_attention"):
        registry.get("ulysses", over_cache=True)
    with pytest.raises(RuntimeError, match="registered twice"):
        registry.register(registry.Strategy("ring", "again"))


def test_a_new_strategy_is_one_declaration():
    """The recipe in docs/architecture.md, followed by a toy: declare it, and sp_attention runs it
    (tests/test_strategies.py then checks every registered strategy at W = 1-4 alike)."""
    calls = []

    def toy_attention(q, k, v, plan, group, causal, scale):
        calls.append(q.shape)
        return allgather_attention(q, k, v, plan, group, causal, scale)

    registry.register(registry.Strategy("toy", "a test-only strategy", whole=toy_attention))
    try:
        assert "toy" in registry.whole_prompt_names() and "toy" not in registry.over_cache_names()
        plan = ShardPlan(seq_lens=[7, 3], world_size=1, scheme="zigzag")
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(10, h, 8, generator=gen) for h in (4, 2, 2))  # GQA
        out = sp_attention(q, k, v, plan=plan, group=None, strategy="toy")
        ref, _ = reference_attention(q, k, v, plan.global_layout, plan.global_layout, True)
        assert calls and torch.allclose(out, ref, atol=1e-5)  # fp32: the same sums in another order
        with pytest.raises(ValueError, match="ulysses_degree is only used by strategy=usp"):
            sp_attention(q, k, v, plan=plan, group=None, strategy="toy", ulysses_degree=1)
    finally:
        registry._TABLE.pop("toy")
