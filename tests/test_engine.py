"""The engine end to end on tiny random models, against HF transformers.

Tolerance: prompt logprobs 1e-4 absolute in fp32. The SP engine and transformers
run the same fp32 arithmetic in a different order (blockwise attention merged by
LSE, sharded projections summed by all-reduce); over 2 layers with O(1) random
weights that moves log-probs by ~1e-6, so 1e-4 leaves room without hiding a bug
(a wrong mask or position moves them by >1e-2).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine_util import check_books
from seqpar import LLM, SamplingParams
from seqpar.engine.executor import EngineDeadError
from seqpar.model import ModelLoadError
from test_model_helpers import VOCAB, tiny_hf_model

# 12 q heads / 2 kv heads (GQA 6), head_dim 8: valid for ulysses and the head-sharded layout at SP 1-4.
HEADS = dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=2)
PROMPTS = [[5, 17, 3, 99, 42, 8, 8, 23, 61, 7, 14], [9], [4, 44, 71], list(range(30, 52))]


def _save(tmp: Path, kind: str, **overrides) -> tuple[torch.nn.Module, str]:
    model = tiny_hf_model(kind, seed=3, **{**HEADS, **overrides})
    model.save_pretrained(tmp)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2").save_pretrained(tmp)
    return model, str(tmp)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("tied"), "llama", tie_word_embeddings=True)


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]  # [T - 1]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return ref[0, len(prompt) :].tolist()


# Small blocks and one-block shard units, so these short prompts spread over every SP rank;
# a small cache, so the block books stay small enough to check whole.
SMALL = dict(block_size=2, shard_blocks=1, kv_cache_gb=2**-12)


def check_against_hf(model, path: str, **engine) -> None:
    """Prompt logprobs of a ragged batch, then greedy generation, both equal to transformers'."""
    sp = engine.get("sp_size", 1)
    with LLM(model=path, **{**SMALL, **engine}) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=1, ignore_eos=True))
        # every block is back in the pool, and the books balance
        assert llm.engine.blocks.usage() == [0.0] * sp
        check_books(llm.engine.blocks, [])
    for prompt, out in zip(PROMPTS, outs):
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        ours = torch.tensor([plp[t][prompt[t]].logprob for t in range(1, len(prompt))])
        if len(prompt) > 1:
            torch.testing.assert_close(ours, hf_prompt_logprobs(model, prompt), atol=1e-4, rtol=0)
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, 6)
        assert out.outputs[0].finish_reason == "length"


# Each prefill strategy at several SP sizes, whole or chunked (max_num_batched_tokens smaller
# than a block, than a shard, than the prompt); decode steps split the MLP over the
# SP ranks (decode_split) or run them whole on each rank with the decode merges rotating;
# a few run with shared_memory=False, so the process-group paths run end to end.
CASES = [
    ("ring", 1, "allgather", True, 2048, True),
    ("ring", 2, "alltoall", True, 2048, False),
    ("ring", 3, "tree", False, 5, True),
    ("ring", 4, "allgather", True, 1, False),
    ("pass_q", 2, "tree", True, 3, False),
    ("pass_q", 3, "alltoall", False, 2048, True),
    ("pass_q", 4, "allgather", True, 7, True),
    ("allgather", 2, "allgather", False, 2048, False),
    ("allgather", 4, "tree", True, 4, True),
    ("auto", 2, "tree", True, 6, True),
]


@pytest.mark.parametrize("strategy, sp, merge, shm, budget, split", CASES)
def test_engine_matches_hf(llama, strategy, sp, merge, shm, budget, split):
    check_against_hf(
        *llama,
        sp_size=sp,
        strategy=strategy,
        decode_merge=merge,
        shared_memory=shm,
        max_num_batched_tokens=budget,
        decode_split=split,
    )


# Qwen2 (q/k/v bias) and tied embeddings at SP 1-4, strategies and schemes rotating.
@pytest.mark.parametrize(
    "fixture, sp, strategy, scheme",
    [
        ("qwen2", 1, "ring", "snake"),
        ("qwen2", 2, "pass_q", "striped"),
        ("qwen2", 4, "ring", "striped"),
        ("tied", 1, "allgather", "snake"),
        ("tied", 2, "ring", "striped"),
        ("tied", 4, "allgather", "striped"),
    ],
)
def test_other_architectures_match_hf(request, fixture, sp, strategy, scheme):
    check_against_hf(*request.getfixturevalue(fixture), sp_size=sp, strategy=strategy, scheme=scheme)


@pytest.mark.parametrize("fixture, sp, tp", [("llama", 1, 2), ("llama", 2, 2), ("qwen2", 1, 2)])
def test_tensor_parallel_matches_hf(request, fixture, sp, tp):
    check_against_hf(*request.getfixturevalue(fixture), sp_size=sp, tp_size=tp, strategy="ring", decode_merge="tree")


def test_bad_input_is_a_clear_error(llama, tmp_path):
    _, path = llama
    with LLM(model=path, sp_size=2) as llm:
        with pytest.raises(ValueError, match="empty prompt"):
            llm.generate([""])
        with pytest.raises(ValueError, match="holds at most 256 tokens"):
            llm.generate([[5] * 300])
        ok = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3))[0]
        assert len(ok.outputs[0].token_ids) == 3
        assert llm.engine.blocks.usage() == [0.0, 0.0]
    with pytest.raises(ModelLoadError, match="neither a known model name"):
        LLM(model="no-such-model")
    with pytest.raises(ModelLoadError, match="holds no model weights"):
        LLM(model=str(tmp_path))
    with pytest.raises(ValueError, match="seqpar.sp_attention"):
        LLM(model=path, sp_size=2, strategy="ulysses")
    with pytest.raises(ValueError, match="tp_size=4 must divide"):
        LLM(model=path, tp_size=4)
    with pytest.raises(ValueError, match="more than this machine allows"):
        LLM(model=path, sp_size=1000)
    with pytest.raises(ValueError, match="strategy="):
        LLM(model=path, strategy="magic")


def test_corrupt_weights_fail_before_ranks_start(llama, tmp_path):
    _, path = llama
    for name in os.listdir(path):
        data = Path(path, name).read_bytes()
        Path(tmp_path, name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    with pytest.raises(ModelLoadError) as info:
        LLM(model=str(tmp_path), sp_size=2)
    assert "safetensors" in str(info.value)


def test_dead_rank_fails_requests_instead_of_hanging(llama):
    _, path = llama
    llm = LLM(model=path, sp_size=2)
    try:
        os.kill(llm.engine.executor._procs[1].pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4))
        with pytest.raises(EngineDeadError):
            llm.generate([PROMPTS[1]])
    finally:
        llm.shutdown()
    assert all(not p.is_alive() for p in llm.engine.executor._procs)


def test_requests_wait_for_cache_and_never_corrupt_each_other(llama):
    """A cache of 4 blocks per rank holds one of these requests at a time: the others are
    preempted and recomputed, and all produce what they produce with room to spare."""
    model, path = llama
    prompts = [[(7 * i + j) % VOCAB for j in range(40)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    per_block = 2 * 2 * 8 * 4 * 2 * 16  # 2 layers x 2 kv heads x D 8 x fp32 x (K, V) x 16 tokens
    with LLM(model=path, sp_size=2, kv_cache_gb=4.5 * per_block / 2**30, shard_blocks=1) as llm:
        assert llm.engine.num_blocks == 4
        outs = llm.generate(prompts, params)
        assert llm.engine.blocks.usage() == [0.0, 0.0]
        check_books(llm.engine.blocks, [])
        with pytest.raises(ValueError, match="at most 128 tokens"):
            llm.generate([[5] * 130])
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, 30)
