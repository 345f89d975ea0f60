"""Decode steps through packed copies of the weights (seqpar.kernels.packed, engine/parallel.py).

Every engine test already decodes through them (on by default); these check the layer itself,
that packed and plain decode agree, and that packing steps aside where the copies would not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from seqpar import LLM, SamplingParams
from seqpar.engine import parallel
from seqpar.engine.config import EngineConfig
from seqpar.kernels.packed import ONEDNN, PackedLinear
from seqpar.model import load_config
from test_model_helpers import save_tiny

pytestmark = pytest.mark.skipif(not ONEDNN, reason="packing needs oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 16, 300])
def test_packed_linear_is_linear(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 40, generator=gen).to(dtype), torch.randn(96, generator=gen).to(dtype)
    x = torch.randn(rows, 40, generator=gen).to(dtype)
    ref = F.linear(x.double(), w.double(), b.double())
    # fp32: sums of 40 products in another order; bf16: one rounding of the output (2^-8 relative)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=2**-7)
    torch.testing.assert_close(PackedLinear(w, b)(x).double(), ref, **tol)
    torch.testing.assert_close(PackedLinear(w)(x.view(1, rows, 40)).double()[0], ref - b.double(), **tol)


@pytest.mark.parametrize("sp", [1, 2])
def test_packed_decode_matches_plain(tmp_path, sp):
    """fp32: the same greedy tokens and log-probs within fp32 summation-order noise."""
    _, path = save_tiny(tmp_path / "m")
    prompts = [[5, 17, 3, 99, 42, 8], [9, 4, 44], list(range(30, 52))]
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, ignore_eos=True)
    outs = {}
    for packed in (True, False):
        with LLM(
            model=str(path), sp_size=sp, dtype="float32", kv_cache_gb=2**-12, block_size=2, packed_decode_weights=packed
        ) as llm:
            outs[packed] = llm.generate(prompts, params)
    for a, b in zip(outs[True], outs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert abs(la[t].logprob - lb[t].logprob) < 1e-4


def test_packing_steps_aside_where_the_copies_do_not_fit(tmp_path, monkeypatch, capfd):
    _, path = save_tiny(tmp_path / "m")
    mc = load_config(str(path))
    config = EngineConfig(model=str(path), sp_size=2, dtype="bfloat16")
    assert parallel.decode_packing(config, mc) == (True, "")
    assert parallel.decode_packing(dataclasses.replace(config, packed_decode_weights=False), mc) == (False, "")
    monkeypatch.setattr(parallel, "PACKED_SHARE", 1e-12)
    packed, why = parallel.decode_packing(config, mc)
    assert not packed and "2 rank(s)" in why and "--no-packed-decode-weights" in why
    # The driver says so once at start-up (every rank of a host reaches the same verdict).
    with LLM(model=str(path), dtype="float32", kv_cache_gb=2**-12, block_size=2) as llm:
        llm.generate([[5, 17, 3]], SamplingParams(max_tokens=2))
    assert "decode weights not packed" in capfd.readouterr().err
