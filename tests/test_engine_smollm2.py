"""The real default model: SP 2 generates exactly what SP 1 does on a ~1K-token prompt
(decoding with the alltoall merge, whose head slices are uneven for its 9 heads)."""

from __future__ import annotations

import pytest

from seqpar import LLM, SamplingParams


@pytest.mark.slow
def test_smollm2_sp2_equals_sp1_on_a_long_prompt():
    facts = [
        f"Station {i} of the northern line opened in {1900 + 7 * i % 97} and serves {i * 37 % 500} riders a day."
        for i in range(60)
    ]
    prompt = " ".join(facts) + " Which station opened first? Answer:"
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)
    outs = {}
    for sp in (1, 2):
        # alltoall at SP 2 splits SmolLM2's 9 q heads unevenly (4 + 5) between the ranks
        # float32: this test's claim is exactness to fp32 rounding (test_bf16 has the bf16 check)
        with LLM(model="smollm2-135m", sp_size=sp, kv_cache_gb=0.25, decode_merge="alltoall", dtype="float32") as llm:
            outs[sp] = llm.generate([prompt], params)[0]
    n = len(outs[1].prompt_token_ids)
    assert 900 <= n <= 1500, n
    assert outs[2].outputs[0].token_ids == outs[1].outputs[0].token_ids
    # prompt log-probs agree along the whole prompt: fp32 sums in another order drift ~1e-5
    # per value over 30 layers; 1e-3 still catches a wrong mask or position (>1e-1)
    for t in range(1, n):
        tok = outs[1].prompt_token_ids[t]
        assert abs(outs[1].prompt_logprobs[t][tok].logprob - outs[2].prompt_logprobs[t][tok].logprob) < 1e-3
