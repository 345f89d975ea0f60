"""The strategy registry: each strategy declared once feeds the library, the engine's config and
CLI, the benchmarks and the cost model; a new strategy is one module (here, a test-only toy)."""

from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.costmodel import formulas, layouts, step_cost
from seqpar.costmodel.profile import DEFAULT
from seqpar.costmodel.step_cost import SeqWork, StepWork, predict_step
from seqpar.engine.config import PREFILL_STRATEGIES, EngineConfig
from seqpar.kernels.attention import reference_attention
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies import registry
from seqpar.strategies.allgather import allgather_attention, allgather_over_cache
from seqpar.strategies.api import sp_attention
from seqpar.strategies.pricing import Cost, LayoutLayer, StepLayer
from test_costmodel_auto import MC  # a Llama-shaped config (GQA 4:1) for the arithmetic


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


def test_every_engine_strategy_declares_its_cost():
    # auto picks among the registry's engine strategies, each priced in its own module
    costs = registry.costs()
    assert set(step_cost.engine_strategies()) == set(registry.over_cache_names())
    for name in registry.over_cache_names():
        assert costs[name].step_s is not None and costs[name].layout_s is not None
        assert formulas.attention_bytes(name, [5, 7], 0, 4, 2, 8, 4) > 0
    # `seqpar plan` prices every strategy that declares a layout cost, Ulysses included
    assert (
        set(layouts.strategies_for(MC, layouts.Layout(tp=1, cp=2, gpus_per_node=8)))
        == {n for n, c in costs.items() if c.layout_s is not None}
        >= {"ring", "pass_q", "allgather", "ulysses"}
    )


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


def test_a_priced_strategy_is_one_declaration_too():
    """A strategy the engine runs over its cache declares its cost with it: the cost model's `auto`
    and `seqpar plan` then weigh it against the others, nothing else edited."""

    def toy_step_s(x: StepLayer) -> float:
        return 0.0  # free: auto must pick it

    def toy_layout_s(x: LayoutLayer) -> float:
        return x.attention_s

    cost = Cost(lambda counts, rank, hq, hkv, d, b: 1, layout_s=toy_layout_s, step_s=toy_step_s, tie_rank=9)
    registry.register(registry.Strategy("toy", "a test-only strategy", over_cache=allgather_over_cache, cost=cost))
    try:
        assert step_cost.engine_strategies()[-1] == "toy"  # the highest tie rank: last in ties
        work = StepWork(2, (SeqWork(((((0, 8),), ((8, 8),))), ((((0, 8),), ((0, 16),)))),))
        predicted = predict_step(work, MC, DEFAULT, threads=1)
        assert set(predicted.seconds) == set(registry.over_cache_names()) and predicted.best() == "toy"
        assert formulas.attention_bytes("toy", [5, 7], 0, 4, 2, 8, 4) == 1
        assert "toy" in layouts.strategies_for(MC, layouts.Layout(tp=1, cp=2, gpus_per_node=8))
    finally:
        registry._TABLE.pop("toy")
