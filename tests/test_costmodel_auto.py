"""The per-step cost model and `strategy="auto"`: its bytes are the bytes the strategies send, its
choice follows from the profile alone, and the profile survives a round trip through its file.

No timing is asserted: profiles here are made up, so the expected choices follow from arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from seqpar import LLM, SamplingParams
from seqpar.cli.main import main as cli_main
from seqpar.comm.collectives import STATS
from seqpar.comm.launch import run_ranks
from seqpar.costmodel.profile import DEFAULT, FILE_NAME, Link, MachineProfile, load_profile, profile_path
from seqpar.costmodel.step_cost import StepWork, predict_step, step_bytes
from seqpar.engine.auto_strategy import step_work
from seqpar.engine.llm_engine import LLMEngine
from seqpar.engine.messages import SeqStep, Step
from seqpar.engine.placement import Placement
from seqpar.engine.step_plan import StepPlan
from seqpar.model import load_config
from seqpar.model.config import ModelConfig
from seqpar.strategies.over_cache import attention_over_cache
from test_engine import _save

ONE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
# A Llama-shaped config for the arithmetic tests (GQA 4:1, as SmolLM2's 9:3 and Llama 3's 32:8).
MC = ModelConfig(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=768,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=16384,
    tie_word_embeddings=True,
    attention_bias=False,
    bos_token_id=None,
    eos_token_ids=(2,),
    architecture="llama",
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _save(Path(tmp_path_factory.mktemp("auto")), "llama")[1]


def _links(latency: float, bandwidth: float) -> dict[str, Link]:
    return {name: Link(latency, bandwidth) for name in ("p2p", "all_to_all", "all_gather", "shm")}


def _profile(latency: float, bandwidth: float, copy: float = 1e10) -> MachineProfile:
    rates = DEFAULT.compute[1]
    fast_copy = dataclasses.replace(rates, copy=((1.0, copy),))
    return MachineProfile("test", {1: fast_copy}, _links(latency, bandwidth))


def _work(world: int, new: int, cached: int, unit_blocks: int = 16) -> StepWork:
    return step_work(Placement(world, 16, unit_blocks, "snake"), [(cached, cached + new)], 0, 4)


# ---- bytes ---------------------------------------------------------------------------------
SPANS = [(10, 37), (0, 13)]  # a chunk over a cached prefix, and a fresh prompt, in one step


def _sent(rank: int, world: int) -> dict[str, tuple[int, int]]:
    """Each strategy's bytes over a step's plan on this rank: (sent, predicted)."""
    bs, hq, hkv, d = 4, MC.num_heads, MC.num_kv_heads, MC.head_dim
    placement = Placement(world, bs, 1, "snake")
    seqs, used = [], [0] * world
    for j, (start, end) in enumerate(SPANS):
        blocks = []
        for i in range(-(-end // bs)):  # each logical block on its owner's next free block
            blocks.append(used[placement.owner(i)])
            used[placement.owner(i)] += 1
        seqs.append(SeqStep(j, list(range(start, end)), start, [blocks], False, False, end))
    plan = StepPlan(Step(seqs, "ring"), placement, rank)
    slots = max(used) * bs
    kh, vh = torch.randn(hkv, slots, d), torch.randn(hkv, slots, d)
    q = torch.randn(len(plan.q_layouts[rank]), hq, d)
    work = step_work(placement, SPANS, 0, 4)
    one_layer = dataclasses.replace(MC, num_layers=1)
    out = {}
    for strategy in ("ring", "pass_q", "allgather"):
        STATS.reset()
        attention_over_cache(q, plan.q_layouts, kh, vh, plan.keys, None, strategy, d**-0.5)
        out[strategy] = (STATS.total, step_bytes(strategy, work, one_layer, rank))
    return out


def test_predicted_bytes_equal_the_bytes_the_strategies_send() -> None:
    """SP 3, ragged shards, two sequences in one step: every strategy sends the model's bytes."""
    for rank_result in run_ranks(_sent, 3):
        for strategy, (sent, predicted) in rank_result.items():
            assert sent == predicted > 0, strategy


# ---- choices from a given profile ------------------------------------------------------------
def test_slow_network_short_suffix_passes_queries() -> None:
    """A few new tokens over a long cache: pass-Q moves ~16 queries, pass-KV/all-gather ~4K keys."""
    slow = _profile(latency=1e-4, bandwidth=1e6)
    cost = predict_step(_work(2, 16, 4096), MC, slow, threads=1)
    assert cost.best() == "pass_q"
    assert cost.seconds["pass_q"] * 10 < cost.seconds["ring"]


def test_slow_network_whole_prompt_passes_keys() -> None:
    """A whole prompt: K/V (2 Hkv heads) is a quarter of the bytes of Q plus partials (Hq heads)."""
    slow = _profile(latency=1e-4, bandwidth=1e6)
    cost = predict_step(_work(2, 4096, 0), MC, slow, threads=1)
    assert cost.best() == "ring"
    assert cost.seconds["pass_q"] > 2 * cost.seconds["ring"]


def test_high_latency_many_ranks_gathers_once() -> None:
    """Latency-bound network at SP 3: the ring waits W - 1 times per layer, the all-gather once."""
    laggy = _profile(latency=0.05, bandwidth=1e12)
    cost = predict_step(_work(3, 256, 512), MC, laggy, threads=1)
    assert cost.best() == "allgather"


def test_free_network_balances_compute() -> None:
    """With a free network the ring's lockstep steps cost their slowest rank each. Positions
    200..299 over 256-token units: at step 0 rank 0 attends 56 queries over its 200 earlier keys
    while rank 1 has a small square; at step 1 rank 1 attends 44 queries over rank 0's 256 keys
    while rank 0 idles. The all-gather sums each rank's work first: about 1.8x less attention."""
    free = _profile(latency=0.0, bandwidth=1e15, copy=1e15)
    cost = predict_step(_work(2, 100, 200), MC, free, threads=1)
    assert cost.attention_s["ring"] > 1.5 * cost.attention_s["allgather"]
    assert cost.best() == "allgather"


def test_choice_is_deterministic_and_ties_go_in_order() -> None:
    slow = _profile(latency=1e-4, bandwidth=1e6)
    work = _work(2, 300, 2000)
    first = predict_step(work, MC, slow, threads=1)
    assert all(predict_step(work, MC, slow, threads=1) == first for _ in range(3))
    empty = StepWork(2, ())
    assert predict_step(empty, MC, slow, threads=1).best() == "ring"


def test_engine_auto_counts_what_the_profile_implies(model, tmp_path, monkeypatch) -> None:
    """A slow network profile in the cache folder: the first prefill passes K/V, a one-token
    question over the cached document passes Q; the engine counts both, and each step sends the
    bytes the model predicted for the strategy it chose."""
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path))
    _profile(latency=1e-4, bandwidth=1e6).save()
    mc = load_config(model)
    placement = Placement(2, 4, 1, "snake")
    seen = []

    def observe(step) -> None:
        work = step_work(placement, step.prefill_spans, step.num_decode, 4)
        seen.append((step.strategy, step.comm_bytes, [step_bytes(step.strategy, work, mc, r) for r in range(2)]))

    doc = [(5 * i) % 90 + 3 for i in range(96)]
    with LLM(model=model, sp_size=2, block_size=4, shard_blocks=1, strategy="auto") as llm:
        assert llm.engine.auto is not None and llm.engine.auto.profile.source == "test"
        llm.engine.observers.append(observe)
        llm.generate([doc], ONE)
        llm.generate([doc + [9]], ONE)
        assert dict(llm.engine.strategy_counts) == {"ring": 1, "pass_q": 1}
    assert [s for s, _, _ in seen] == ["ring", "pass_q"]
    for _, sent, predicted in seen:
        assert sent == predicted


# ---- the profile file ---------------------------------------------------------------------------
def test_profile_round_trip_and_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path))
    assert profile_path() == tmp_path / FILE_NAME
    assert load_profile() is DEFAULT  # nothing saved yet: the built-in profile
    path = DEFAULT.save()
    again = load_profile()
    assert again.to_dict() == DEFAULT.to_dict()
    assert again.rate("attention_full", 100, 1) == DEFAULT.rate("attention_full", 100, 1)
    assert again.rate("gemm", 100, 4) == 2 * DEFAULT.rate("gemm", 100, 2)  # unmeasured threads scale
    assert json.loads(path.read_text())["format"] == 1


@pytest.mark.parametrize(
    "text, says",
    [
        ("{not json", "Expecting property name"),
        ('{"format": 1, "compute": {}, "links": {}, "overlap": 0, "call_s": 0}', "at least one thread count"),
        ('{"format": 1, "compute": {}, "links": {}}', "incomplete or malformed: KeyError"),
        ('{"format": 7}', "format-1"),
    ],
)
def test_damaged_profile_is_a_clear_error(model, tmp_path, monkeypatch, text, says) -> None:
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path))
    (tmp_path / FILE_NAME).write_text(text)
    with pytest.raises(ValueError) as info:
        LLMEngine(_config(model))
    msg = str(info.value)
    assert says in msg and str(tmp_path / FILE_NAME) in msg and "seqpar tune" in msg


def _config(model: str):
    from seqpar.engine.config import EngineConfig

    return EngineConfig(model=model, sp_size=2, strategy="auto")


def test_tune_quick_writes_a_loadable_profile(model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path))
    assert cli_main(["tune", "--quick", "--model", model]) == 0
    err = capsys.readouterr().err
    path = tmp_path / FILE_NAME
    assert str(path) in err
    profile = MachineProfile.load(path)
    assert 1 in profile.compute and set(profile.links) == {"p2p", "all_to_all", "all_gather", "shm"}
    assert load_profile().to_dict() == profile.to_dict()


def test_window_layers_are_priced_over_their_window() -> None:
    """A sliding-window layer's step sees only the keys its queries reach: a 2,048-token chunk after
    6,000 cached tokens costs a window model's layers far less attention and bytes than global ones."""
    windowed = dataclasses.replace(MC, sliding_window=64, layer_types=("sliding_attention",) * MC.num_layers)
    work, slow = _work(2, 2048, 6000), _profile(1e-5, 1e9)
    whole, win = (predict_step(work, m, slow, threads=1) for m in (MC, windowed))
    assert all(win.attention_s[s] < whole.attention_s[s] / 10 for s in whole.attention_s)
    assert win.linear_s == whole.linear_s
    assert step_bytes("ring", work, windowed, 0) < step_bytes("ring", work, MC, 0) / 3
    cut = work.within(64)  # keys from position 6000 - 63 on
    assert sum(cut.key_counts()) == 2048 + 63
