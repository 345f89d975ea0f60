"""The engine on each attention backend a CPU runs (`attention_backend`, kernels/backends.py).

`torch` is the GPU's code paths on CPU tensors: decode rows through block tables (`PagedDecode`'s
torch twin at SP > 1, the static-buffer step at SP 1: what CUDA graphs replay on a GPU), blocks in
plain torch, against transformers as every engine test (prompt logprobs within 1e-4 in fp32,
greedy tokens equal). A backend that does not run on the device is a clear error.
"""

from __future__ import annotations

import pytest

from seqpar.engine.config import EngineConfig
from test_engine import _save, check_against_hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize(
    "sp, strategy, merge, budget, shm",
    [
        (1, "ring", "allgather", 2048, True),  # the static-buffer decode step, eager
        (1, "ring", "allgather", 5, True),  # chunks, the static step for decode-only steps
        (2, "pass_q", "tree", 3, False),  # static steps' pieces cut at the merges over the group
        (3, "ring", "alltoall", 2048, True),  # ... and through shared memory
    ],
)
def test_torch_backend_matches_hf(llama, sp, strategy, merge, budget, shm):
    check_against_hf(
        *llama,
        attention_backend="torch",
        sp_size=sp,
        strategy=strategy,
        decode_merge=merge,
        max_num_batched_tokens=budget,
        shared_memory=shm,
    )


@pytest.mark.parametrize("sp", [1, 2])  # the static step's per-group buffers; paged rows over ranks
def test_torch_backend_with_sliding_windows(tmp_path, sp):
    """Window layers through block tables: rows from their window's first key, freed pages listed."""
    from test_gemma3 import GEMMA3

    check_against_hf(*_save(tmp_path, "gemma3", **GEMMA3), attention_backend="torch", sp_size=sp,
                     max_num_batched_tokens=5)  # fmt: skip


def test_a_backend_off_its_device_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"attention_backend='triton' does not run on device='cpu'; choose one of auto, cpu, torch"
    ):
        EngineConfig(attention_backend="triton")
    with pytest.raises(ValueError, match=r"enable_deterministic_inference .* leave it 'auto'"):
        EngineConfig(attention_backend="torch", enable_deterministic_inference=True)
    with pytest.raises(
        ValueError, match=r"attention_backend='flash' is not supported; choose one of auto, cpu, triton, torch"
    ):
        EngineConfig(attention_backend="flash")


@pytest.mark.parametrize("sp, merge", [(1, "allgather"), (2, "allgather")])  # (SP 3: test_torch_backend_matches_hf)
def test_static_decode_steps_match_eager_ones(llama, sp, merge):
    """The static-buffer step (what CUDA graphs replay) against the eager paged step, on CPU: a ragged
    batch that pads to buckets and shrinks as requests finish, greedy rows (at SP 1 tokens chosen on
    the device), seeded sampling with log-probs (logits to the host sampler), and unseeded sampling
    (at SP 1 drawn on the device: another generator than eager steps, so only its count is compared).
    At SP 2 the step's pieces between collectives (the decode merges, the split MLP's sums), rows
    whose new token another rank caches writing the scratch slot, greedy tokens from the ranks' tops."""
    from seqpar import LLM, SamplingParams

    prompts = [[5, 9, 13][: 1 + i % 3] * (1 + 7 * i) for i in range(8)]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True) for i in range(6)]
    params.append(SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=9, ignore_eos=True, logprobs=2))
    params.append(SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True))
    runs = []
    for eager in (False, True):
        with LLM(
            model=llama[1], attention_backend="torch", enforce_eager=eager, kv_cache_gb=0.01, sp_size=sp,
            decode_merge=merge, step_timeout_s=120,
        ) as llm:  # fmt: skip
            runs.append([o.outputs[0] for o in llm.generate(prompts, params)])
    static, plain = runs
    assert [o.token_ids for o in static[:7]] == [o.token_ids for o in plain[:7]]
    # greedy rows' log-probs: at SP 1 from the device's logits, at SP > 1 from every rank's top and
    # logsumexp (the eager step's from the whole row on the host): fp32, summed in other orders
    for a, b in zip(static[:6], plain[:6]):
        assert abs(a.cumulative_logprob - b.cumulative_logprob) < 1e-4
    for a, b in zip(static[6].logprobs, plain[6].logprobs):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    assert len(static[7].token_ids) == len(plain[7].token_ids) == 5
