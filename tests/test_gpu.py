"""The GPU paths (device="cuda": NCCL, or gloo for ranks sharing a GPU; model and KV cache on the GPU;
the CUDA attention kernels) against the same references as the CPU tests. Where no GPU is visible they skip, saying so;
`scripts/gpu_check.sh` runs them on a GPU machine and fails if they cannot run. Only the
device checks at the end (a clear error for cuda without a GPU) run everywhere.

Tolerances: fp32 on CUDA (the memory-efficient kernel; TF32 is off by torch's default) differs
from the dense fp32 reference by summation order only, ~1e-6: 2e-5 as on CPU, with room. bf16 and
fp16 go through the flash kernel: inputs are rounded to 8 (bf16) or 11 (fp16) mantissa bits and
the output is stored in that type, ~2^-8 relative on outputs of magnitude ~1, so 3e-2; its LSE is
accumulated in fp32 from the same rounded inputs, 1e-2. The engine in fp32 is held to
test_engine's 1e-4 on prompt logprobs and to transformers' greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from seqpar import LLM, SamplingParams, TokenLayout, attention_with_lse, reference_attention
from seqpar.engine.config import EngineConfig
from test_cli import run_main
from test_engine import CASES, _save, check_against_hf
from test_model_helpers import VOCAB

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(
    GPUS < 1,
    reason="no CUDA GPU visible (torch.cuda.is_available() is False); scripts/gpu_check.sh runs these on a GPU machine",
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("llama"), "llama")


def _ragged_case(hkv: int, d: int, order: str) -> tuple[torch.Tensor, ...]:
    """A packed batch of 3 sequences (130, 5 and 37 tokens). Queries: every token, packed (runs of
    stride 1 against the keys': the fused kernels' causal squares) or striped (stride 3: the masked
    path). Keys: positions 86.. of the first sequence and all of the third; the second sequence's
    queries (and, causal, the first's before 86) see no key: lse -inf, out 0."""
    lens = [130, 5, 37]
    seq = torch.tensor([s for s, n in enumerate(lens) for _ in range(n)])
    pos = torch.tensor([p for n in lens for p in range(n)])
    rows = list(range(len(seq)))
    if order == "striped":
        rows.sort(key=lambda i: (int(pos[i]) % 3, i))
    qi, ki = torch.tensor(rows), torch.cat([torch.arange(86, 130), torch.arange(135, 172)])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(seq), 6, d, generator=gen)[qi]
    k = torch.randn(len(seq), hkv, d, generator=gen)[ki]
    v = torch.randn(len(seq), hkv, d, generator=gen)[ki]
    return q, k, v, TokenLayout.build(seq[qi], pos[qi]), TokenLayout.build(seq[ki], pos[ki])


@needs_gpu
@pytest.mark.parametrize(
    "dtype, atol, lse_atol", [(torch.float32, 2e-5, 2e-5), (torch.bfloat16, 3e-2, 1e-2), (torch.float16, 3e-2, 1e-2)]
)
@pytest.mark.parametrize("hkv", [1, 2, 6])  # MQA, GQA, MHA: the CUDA kernels repeat kv heads
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("order", ["packed", "striped"])
def test_cuda_attention_matches_reference(dtype, atol, lse_atol, hkv, causal, order):
    q, k, v, ql, kl = _ragged_case(hkv, 64, order)
    out, lse = attention_with_lse(*(t.to("cuda", dtype) for t in (q, k, v)), ql, kl, causal)
    assert out.device.type == "cuda" and out.dtype == dtype and lse.dtype == torch.float32
    # the reference in fp32 on the host, from the same rounded inputs
    ref_out, ref_lse = reference_attention(*(t.to(dtype).float() for t in (q, k, v)), ql, kl, causal)
    out, lse = out.cpu().float(), lse.cpu()
    blind = torch.isinf(ref_lse)  # rows that see no key
    assert blind.any() and torch.equal(torch.isinf(lse), blind) and (lse[blind] < 0).all()
    assert (out[blind] == 0).all() and not torch.isnan(out).any()
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse[~blind], ref_lse[~blind], atol=lse_atol, rtol=0)


@needs_gpu
def test_cuda_decode_block_matches_reference():
    """One query over 5000 keys (a decode row): on CUDA the fused kernel, not the CPU few-queries path."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(1, 8, 64, generator=gen),
        torch.randn(5000, 2, 64, generator=gen),
        torch.randn(5000, 2, 64, generator=gen),
    )
    ql, kl = TokenLayout.build([0], [5000]), TokenLayout.build([0] * 5000, list(range(5000)))
    out, lse = attention_with_lse(q.cuda(), k.cuda(), v.cuda(), ql, kl, False)
    ref_out, ref_lse = reference_attention(q, k, v, ql, kl, False)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=0)


@needs_gpu
@pytest.mark.parametrize("budget", [2048, 5])  # whole prompts; chunks smaller than a prompt
@pytest.mark.parametrize("eager", [False, True])  # decode steps as captured graphs, or eager (Triton's kernel)
def test_engine_on_cuda_matches_hf_sp1(llama, budget, eager):
    check_against_hf(*llama, device="cuda", max_num_batched_tokens=budget, enforce_eager=eager)


@needs_gpu
@pytest.mark.parametrize("eager", [False, True])
def test_gemma3_windows_on_cuda_match_hf(tmp_path, eager):
    """Sliding-window layers on a GPU: masked prefill tiles, decode rows from their window's first
    key in the paged kernel (graphs per layer group, or eager), blocks freed out of the window."""
    from test_gemma3 import GEMMA3

    check_against_hf(*_save(tmp_path, "gemma3", **GEMMA3), device="cuda", max_num_batched_tokens=5,
                     enforce_eager=eager)  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("sp", [1, 2])  # SP 2: graphs in pieces cut at the merges and the split MLP's sums
def test_decode_graphs_match_eager_steps(llama, sp):
    """A ragged batch that pads to graph buckets and shrinks as requests finish, greedy and seeded
    sampling (the rows whose logits go to the host sampler): the same tokens as eager steps."""
    prompts = [[5, 9, 13][: 1 + i % 3] * (1 + 7 * i) for i in range(7)]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True) for i in range(6)]
    params.append(SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=9, ignore_eos=True, logprobs=2))
    runs = []
    # (unseeded non-greedy rows sample on the device: other draws than eager steps, so not compared)
    for eager in (False, True):
        with LLM(model=llama[1], device="cuda", enforce_eager=eager, kv_cache_gb=0.05, sp_size=sp) as llm:
            runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]


@needs_gpu
def test_sampler_on_the_device():
    """The static step's unseeded non-greedy rows sample on the GPU with the host sampler's code:
    greedy and top-k 1 are the argmax, top-p's draws stay in its nucleus, banned ids never come,
    log-probs are the raw distribution's, as on the host."""
    from seqpar.engine.sampling import Sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.7, top_p=0.5, logprobs=2),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.0),
    ]
    banned = [[], [], [], [], [], [int(logits[5].argmax())]]
    host = Sampler(0)(logits, params, None, banned)
    for _ in range(20):
        dev = Sampler(1, "cuda")(logits.cuda(), params, None, banned)
        assert dev.token_ids[:2] == host.token_ids[:2] == logits[:2].argmax(-1).tolist()
        probs = logits[2].div(0.7).softmax(-1)
        order = probs.argsort(descending=True)
        nucleus = order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist()
        assert dev.token_ids[2] in nucleus
        assert dev.token_ids[4] in logits[4].topk(5).indices.tolist()
        assert dev.token_ids[5] != banned[5][0]
        # the same top tokens and ranks; log-probs to fp32 rounding (CUDA's log_softmax sums in another order)
        top_dev, top_host = dev.top_logprobs[0], host.top_logprobs[0]
        assert top_dev.keys() == top_host.keys()
        assert all(top_dev[t].rank == top_host[t].rank for t in top_host)
        assert all(abs(top_dev[t].logprob - top_host[t].logprob) < 1e-5 for t in top_host)
        raw = logits.log_softmax(-1)
        for i, t in enumerate(dev.token_ids):
            assert abs(dev.logprobs[i] - float(raw[i, t])) < 1e-5


# SP 2-4 on cuda, test_engine's cases: a GPU per rank where there are enough (NCCL; shared memory
# is asked for and must be turned off), else every rank on the GPUs they share (gloo, CUDA tensors
# through host memory: shared memory or the group). Each prefill strategy and decode merge, decode
# steps split or whole, against transformers in fp32: the strategies' CUDA code at W > 1.
@needs_gpu
@pytest.mark.parametrize("strategy, sp, merge, shm, budget, split", [c for c in CASES if c[1] > 1])  # the CPU's
def test_engine_on_cuda_matches_hf_sp(llama, strategy, sp, merge, shm, budget, split):
    check_against_hf(
        *llama,
        device="cuda",
        sp_size=sp,
        strategy=strategy,
        decode_merge=merge,
        shared_memory=shm,
        max_num_batched_tokens=budget,
        decode_split=split,
    )


@needs_gpu
def test_engine_on_cuda_tensor_parallel_matches_hf(llama):  # two GPUs, or both ranks on one
    check_against_hf(*llama, device="cuda", tp_size=2, decode_merge="tree")


@needs_gpu
def test_sp_on_one_gpu_in_bf16_stays_close_to_sp1(tmp_path):
    """A ~4K-token prompt in bf16 (the issue's check: vLLM's check_logprobs_close against SP 1)."""
    from test_bf16 import TOP, check_logprobs_close

    _, path = _save(tmp_path, "llama", max_position_embeddings=8192)
    prompt = torch.randint(3, VOCAB, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=TOP)
    outs = {}
    for sp in (1, 2, 4):
        with LLM(model=path, device="cuda", sp_size=sp, dtype="bfloat16", kv_cache_gb=0.2,
                 max_num_batched_tokens=1024) as llm:  # fmt: skip
            outs[sp] = llm.generate([prompt], params)[0].outputs[0]
    for sp in (2, 4):
        assert len(outs[sp].token_ids) == 16
        check_logprobs_close(outs[1], outs[sp], f"SP {sp} on one GPU")


# ---- these run everywhere ------------------------------------------------------------------


def test_ranks_share_gpus_only_when_they_outnumber_them():
    from seqpar.comm.launch import gpu_placement

    assert [gpu_placement(r, 2, 2) for r in range(2)] == [("nccl", 0), ("nccl", 1)]
    assert [gpu_placement(r, 2, 8) for r in range(2)] == [("nccl", 0), ("nccl", 1)]
    assert [gpu_placement(r, 4, 1) for r in range(4)] == [("gloo", 0)] * 4
    assert [gpu_placement(r, 3, 2) for r in range(3)] == [("gloo", 0), ("gloo", 1), ("gloo", 0)]
    with pytest.raises(RuntimeError, match="no GPU; use device='cpu'"):
        gpu_placement(0, 1, 0)


def test_unknown_device_names_the_choices():
    with pytest.raises(ValueError, match=r"device='tpu' is not supported; choose one of cpu, cuda"):
        EngineConfig(device="tpu")


@pytest.mark.skipif(GPUS > 0, reason="a GPU is visible: device='cuda' is valid here")
def test_cuda_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match=r"device='cuda' but torch.cuda.is_available\(\) is False.*device='cpu'"):
        EngineConfig(device="cuda")
    rc, out, err = run_main(capsys, ["generate", "--prompt", "hi", "--device", "cuda"])
    assert rc == 2 and out == "" and "--device 'cuda'" in err and err.count("\n") == 1, err  # the flag typed
