"""Long steps' per-token work through torch.compile (seqpar.model.compiled) against eager.

Compiled code fuses the elementwise work around the GEMMs: the same sums, rounded at other
points, so fp32 agrees to ~1e-5 and bf16 to its rounding; greedy tokens of the engine agree."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from seqpar import LLM, SamplingParams
from seqpar.model import load_model
from seqpar.model.compiled import compile_tiles, why_eager
from seqpar.model.llama import ROW_TILE
from seqpar.model.reference import dense_causal_attention
from test_model_helpers import save_tiny

LONG = dict(max_position_embeddings=4096)
# Inductor compiles C++ for CPU; without a compiler the engine runs eager and says so.
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler (g++)"
)


@pytest.fixture
def dynamo(monkeypatch):
    """torch.compile on for this test (tests/conftest.py turns it off) and in processes it starts."""
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    with torch._dynamo.config.patch(disable=False):
        yield


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_compiled_tiles_match_eager(tmp_path, dynamo, dtype, tol):
    _, path = save_tiny(tmp_path / "m", **LONG)
    eager, _ = load_model(path, dtype=dtype, shared=False)
    model, _ = load_model(path, dtype=dtype, shared=False)
    seconds, why = compile_tiles(model)
    assert why is None and seconds > 0
    assert all(layer.tiles is not None for layer in model.model.layers)
    t = 2 * ROW_TILE + 37  # two compiled tiles and an eager remainder
    ids = torch.randint(0, 101, (t,), generator=torch.Generator().manual_seed(0))
    attention = dense_causal_attention(torch.zeros(t, dtype=torch.long))
    with torch.inference_mode():
        got = model(ids, torch.arange(t), attention)
        want = eager(ids, torch.arange(t), attention)
    # fp32: the same sums in another rounding order; bf16: a few ulps of activations ~1 (2^-7 each)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_eager_says_why(tmp_path):
    _, path = save_tiny(tmp_path / "m")
    model, _ = load_model(path, shared=False)
    with torch._dynamo.config.patch(disable=True):
        assert "TORCH_COMPILE_DISABLE" in why_eager(model)
        assert compile_tiles(model) == (None, why_eager(model))
    assert all(layer.tiles is None for layer in model.model.layers)


@needs_compiler
def test_engine_compiled_matches_eager(tmp_path, dynamo, capfd):
    """A prompt of two full tiles and a remainder: the same greedy tokens, log-probs within fp32 noise."""
    _, path = save_tiny(tmp_path / "m", **LONG)
    prompt = torch.randint(3, 101, (2 * ROW_TILE + 100,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True)
    outs = {}
    for eager in (False, True):
        with LLM(model=str(path), dtype="float32", enforce_eager=eager, max_num_batched_tokens=4096) as llm:
            outs[eager] = llm.generate([prompt], params)[0].outputs[0]
    assert "1024-row tiles compiled in" in capfd.readouterr().err
    assert outs[False].token_ids == outs[True].token_ids
    for a, b in zip(outs[False].logprobs, outs[True].logprobs):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible; scripts/gpu_check.sh runs it on one")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_compiled_whole_chunks_on_cuda_match_eager(tmp_path, dynamo, dtype, tol):
    """On CUDA a layer's per-token work is compiled over whole chunks, the row count symbolic: chunks
    of two lengths through one graph each function, against eager."""
    _, path = save_tiny(tmp_path / "m", **LONG)
    eager = load_model(path, dtype=dtype, shared=False)[0].cuda()
    model = load_model(path, dtype=dtype, shared=False)[0].cuda()
    seconds, why = compile_tiles(model)
    assert why is None and seconds > 0
    for t in (ROW_TILE + 5, 2 * ROW_TILE + 37):
        ids = torch.randint(0, 101, (t,), generator=torch.Generator().manual_seed(t)).cuda()
        attention = dense_causal_attention(torch.zeros(t, dtype=torch.long, device="cuda"))
        with torch.inference_mode():
            got = model(ids, torch.arange(t, device="cuda"), attention)
            want = eager(ids, torch.arange(t, device="cuda"), attention)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible; scripts/gpu_check.sh runs it on one")
def test_captured_decode_steps_run_compiled_functions_on_cuda(tmp_path, dynamo, capfd):
    """Decode steps captured as CUDA graphs run their rows through the compiled functions (one row and
    a padded batch: a graph each): the same greedy tokens as eager steps, log-probs within fp32 noise."""
    _, path = save_tiny(tmp_path / "m", **LONG)
    prompts = [[5, 9, 13] * (1 + 9 * i) for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True)
    outs = {}
    for eager in (False, True):
        with LLM(model=str(path), device="cuda", dtype="float32", enforce_eager=eager, kv_cache_gb=0.05) as llm:
            outs[eager] = [o.outputs[0] for o in llm.generate(prompts[:1], params) + llm.generate(prompts, params)]
    assert "chunks of 1024+ rows compiled in" in capfd.readouterr().err
    for got, want in zip(outs[False], outs[True]):
        assert got.token_ids == want.token_ids
        for a, b in zip(got.logprobs, want.logprobs):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
