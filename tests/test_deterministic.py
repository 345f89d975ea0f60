"""Deterministic inference: a request's bits, whatever the SP degree, chunking, batch and cache.

No tolerance: prompt logprobs, sampled tokens and their logprobs (top 2 too) must be equal, bit
for bit (Python floats from fp32), to those of the same request alone on one rank, in one
chunk, without prefix caching. Each engine runs the batch of 8 twice: cold, then with every
prefix cached. Each axis (SP 1-4, chunk size, strategy, decode merge, shared memory or the
process group) is covered against that one reference in fp32 and in bf16, not their product.
Tiny model: two-token blocks in four-token KV units, so 20-40 token prompts span many units
and every rank; a 3-token budget splits prompts into chunks smaller than a unit.
"""

from __future__ import annotations

import pytest
import torch

from engine_util import needle_document
from seqpar import LLM, SamplingParams
from seqpar.kernels import canonical, invariant
from test_engine import _save

pytestmark = pytest.mark.timeout(300)
SMALL = dict(block_size=2, shard_blocks=2, kv_cache_gb=2**-12, enable_deterministic_inference=True)
BASE = [5, 17, 3, 99, 42, 8, 8, 23, 61, 7]
# Shared prefixes (cached on the second pass), ragged lengths, one token long.
PROMPTS = [BASE + [9, 4], BASE + [9, 4, 5, 60, 61] * 2, list(range(30, 45)), [7], BASE, list(range(60, 77)), BASE * 2]
PROMPTS.append(BASE + [11, 12, 13])
# Greedy, seeded and unseeded sampling (unseeded: as if seeded with the engine's seed), logprobs.
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, prompt_logprobs=2, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=4, logprobs=2, prompt_logprobs=1, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=20, max_tokens=3, logprobs=0, ignore_eos=True),
]


def _params(i: int) -> SamplingParams:
    return PARAMS[i % len(PARAMS)]


def _bits(out) -> tuple:
    """What must be equal: prompt logprobs (top-k too), tokens, sampled logprobs (top-k too)."""

    def entries(rows):
        return [None if e is None else sorted((t, lp.logprob, lp.rank) for t, lp in e.items()) for e in rows or []]

    gen = out.outputs[0]
    return entries(out.prompt_logprobs), gen.token_ids, entries(gen.logprobs)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return _save(tmp_path_factory.mktemp("llama"), "llama")[1]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> str:
    """Layers [window 5, global, window 5]: window units, freed blocks, GELU-tanh, four norms."""
    from test_gemma3 import GEMMA3

    return _save(tmp_path_factory.mktemp("gemma3"), "gemma3", **GEMMA3)[1]


_REFERENCE: dict[tuple[str, str], list[tuple]] = {}


def reference(model: str, dtype: str) -> list[tuple]:
    """Each request alone, one rank, one chunk, nothing cached."""
    if (model, dtype) not in _REFERENCE:
        with LLM(model=model, dtype=dtype, enable_prefix_caching=False, **SMALL) as llm:
            _REFERENCE[model, dtype] = [_bits(llm.generate([p], _params(i))[0]) for i, p in enumerate(PROMPTS)]
    return _REFERENCE[model, dtype]


# (model, dtype, sp, strategy, decode merge, max_num_batched_tokens, shared memory)
CASES = [
    ("model", "float32", 1, "ring", "allgather", 3, True),
    ("model", "float32", 2, "ring", "alltoall", 2048, True),
    ("gemma3", "float32", 3, "pass_q", "tree", 7, True),
    ("model", "float32", 4, "allgather", "allgather", 5, False),
    ("model", "bfloat16", 2, "allgather", "tree", 3, False),
    ("gemma3", "bfloat16", 4, "pass_q", "alltoall", 7, True),
]


@pytest.mark.parametrize("fixture, dtype, sp, strategy, merge, budget, shm", CASES)
def test_same_bits_in_any_layout(request, fixture, dtype, sp, strategy, merge, budget, shm):
    model = request.getfixturevalue(fixture)
    with LLM(
        model=model,
        dtype=dtype,
        sp_size=sp,
        strategy=strategy,
        decode_merge=merge,
        max_num_batched_tokens=budget,
        shared_memory=shm,
        **SMALL,
    ) as llm:
        params = [_params(i) for i in range(len(PROMPTS))]
        cold = llm.generate(PROMPTS, params)
        cached = llm.generate(PROMPTS, params)
    assert sum(o.num_cached_tokens for o in cached) > 0
    for i, (a, b) in enumerate(zip(cold, cached)):
        assert _bits(a) == reference(model, dtype)[i], f"request {i} (cold) differs from the reference"
        assert _bits(b) == reference(model, dtype)[i], f"request {i} (cached prefix) differs from the reference"


def test_what_the_mode_does_not_run_is_refused():
    from seqpar.engine.config import EngineConfig

    for bad, named in [(dict(dtype="float16"), "float16"), (dict(tp_size=2), "tp_size=2")]:
        with pytest.raises(ValueError, match=named):
            EngineConfig(enable_deterministic_inference=True, **bad)


def test_bf16_differs_without_the_mode(model):
    """The mode is what makes bf16 agree: without it, SP 2 in chunks moves some bf16 logprob."""
    with LLM(
        model=model,
        dtype="bfloat16",
        sp_size=2,
        max_num_batched_tokens=3,
        **{**SMALL, "enable_deterministic_inference": False},
    ) as llm:
        outs = llm.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))])
    assert any(_bits(o) != r for o, r in zip(outs, reference(model, "bfloat16")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_the_rows_around_them(dtype):
    """With the calls probed for this CPU, and with fixed 32-row tiles (what a CPU whose kernel
    changes with the row count gets, AMX): both hold here, whichever the probe chose."""
    assert invariant.call_rows(dtype) in (0, invariant.TILE_ROWS)
    for k, n in [(48, 80), (96, 96), (576, 1536), (1536, 576)]:
        assert invariant.rows_are_invariant(k, n, dtype), (k, n, dtype)
        assert invariant.rows_are_invariant(k, n, dtype, tile=invariant.TILE_ROWS), (k, n, dtype)


def test_vocab_slices_are_whole_tiles():
    assert invariant.vocab_slices(101, 3) == [slice(0, 101), slice(101, 101), slice(101, 101)]
    tiles = invariant.vocab_slices(49152, 3)
    assert [s.start for s in tiles] == [0, 16384, 32768] and tiles[-1].stop == 49152


@pytest.mark.parametrize("hq, hkv, d, unit", [(12, 2, 8, 8), (4, 1, 128, 64)])
def test_a_unit_partial_is_the_same_at_every_row_count(hq, hkv, d, unit):
    """A row over one whole unit among 1-40 rows and among 300: the same bits, which holds only
    where the kernel's last query block never takes a small-GEMM path (up to 7 rows on an Intel
    Xeon with AMX at these shapes: the tests' heads of 8 dims over units of 8 keys, Llama's of 128)."""
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(hkv, unit, d, generator=gen) for _ in range(2))
    q = torch.randn(300, hq, d, generator=gen)

    def row(n: int) -> torch.Tensor:
        merge = canonical.OrderedMerge(n, hq, d, q.device)
        canonical.attend_unit(merge, 0, q[-n:], torch.full((n,), unit), k, v, 0.3)
        return merge.result()[-1]

    want = row(300)
    assert [n for n in range(1, 41) if not torch.equal(row(n), want)] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_unit_partial_does_not_depend_on_the_rows_beside_it(dtype):
    """One query over one KV unit, alone (decode), among 40 rows, among 300: the same bits."""
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, unit = 12, 2, 8, 64
    k, v = (torch.randn(hkv, unit, d, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(300, hq, d, generator=gen).to(dtype)
    results = []
    for n, at in [(1, 0), (40, 17), (300, 250)]:
        rows = torch.randn(n, hq, d, generator=gen).to(dtype)
        rows[at] = q[0]
        vis = torch.full((n,), unit)
        vis[at] = 37
        vis = vis.sort().values  # non-decreasing, as the callers give them
        at = int((vis < 37).sum())
        rows[at] = q[0]
        merge = canonical.OrderedMerge(n, hq, d, q.device)
        canonical.attend_unit(merge, 0, rows, vis, k, v, 0.3)
        results.append(merge.result()[at])
    # A decode step: the row as element 1 of a batch of 3 units (one call), the others unlike it.
    ks, vs = (torch.stack([torch.randn_like(x), x, torch.randn_like(x)]) for x in (k, v))
    rows = torch.stack([torch.randn_like(q[0]), q[0], torch.randn_like(q[0])])
    o, _ = canonical.unit_partials(rows, ks, vs, torch.tensor([unit, 37, 5]), 0.3)
    results.append(o[1])
    assert all(torch.equal(r, results[0]) for r in results)
    # A sliding window's row: keys [9, 37) of the unit, among rows whose windows start elsewhere.
    windowed = []
    for n, at in [(1, 0), (40, 17)]:
        rows = torch.randn(n, hq, d, generator=gen).to(dtype)
        rows[at] = q[0]
        vis, lo = torch.full((n,), 37), torch.arange(n).clamp(max=30)
        lo[at] = 9
        merge = canonical.OrderedMerge(n, hq, d, q.device)
        canonical.attend_unit(merge, 0, rows, vis, k, v, 0.3, lo)
        windowed.append(merge.result()[at])
    rows = torch.stack([torch.randn_like(q[0]), q[0], torch.randn_like(q[0])])  # and in a decode step
    o, _ = canonical.unit_partials(rows, ks, vs, torch.tensor([unit, 37, 5]), 0.3, lo=torch.tensor([0, 9, 2]))
    windowed.append(o[1])
    assert all(torch.equal(r, windowed[0]) for r in windowed) and not torch.equal(windowed[0], results[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_mlp_has_the_whole_mlps_bits(dtype):
    """A decode row through the MLP split over 3 ranks (each rank's features, gathered) and whole."""
    from seqpar.model import deterministic as det
    from seqpar.model.layers import SwiGLUMLP

    torch.manual_seed(0)
    mlp = SwiGLUMLP(576, 1536).to(dtype)
    x = torch.randn(1, 576).to(dtype)
    world, done = 3, []

    def gather(t):  # ranks run in turn: the last one sees every rank's part
        done.append(t)
        return torch.stack(done + [torch.zeros_like(t)] * (world - len(done)))

    bounds = [(r * 1536 // world, (r + 1) * 1536 // world) for r in range(world)]
    parts = [det.InvariantSplitMLP(mlp, bounds, r, gather) for r in range(world)]
    det.invariant_mlp(mlp)
    with torch.inference_mode():
        outs = [part(x) for part in parts]
        assert torch.equal(outs[-1], mlp(x))


def test_bf16_head_refines_its_top_in_fp32_alike_for_any_rows_and_slices(tmp_path):
    """The deterministic bf16 head, as compute_logits: each row's top REFINE logits in fp32 (a
    bf16 GEMM alone is off by > 1e-3), the same bits for a row alone (one thread) or among 40,
    whole or as every rank's vocabulary slice gathered and then refined (the worker's decode)."""
    from seqpar.model import deterministic as det
    from seqpar.model import load_model

    vocab = 2 * invariant.VOCAB_TILE + 452  # three tiles: slices at SP 2 and 3
    model, _ = load_model(_save(tmp_path, "llama", vocab_size=vocab)[1], torch.bfloat16)
    hidden = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    weight = model.lm_head.weight
    exact = hidden @ weight.float().t()  # [40, V]
    top = exact.topk(5).indices
    threads = torch.get_num_threads()
    with torch.inference_mode():
        whole = det.logits(model, hidden)
        # fp32 products of the same bf16 weights, summed in another order than the GEMM: a few
        # ulps of logits up to ~4 here (measured 2e-6; the normal path's test allows 1e-5 too)
        assert torch.allclose(whole.gather(-1, top), exact.gather(-1, top), atol=1e-5, rtol=0)
        rounded = torch.nn.functional.linear(hidden.bfloat16(), weight).float()  # no refinement
        assert (rounded.gather(-1, top) - exact.gather(-1, top)).abs().max() > 1e-3  # measured 1.6e-2
        # Log-probs: the unrefined tail's bf16 rounding reaches them through the normalizer alike
        # in both paths (measured 5e-4 on this flat random model; 1.5e-2 unrefined).
        want = exact.log_softmax(-1).gather(-1, top)
        err = (whole.log_softmax(-1).gather(-1, top) - want).abs().max()
        assert err <= (model.compute_logits(hidden).log_softmax(-1).gather(-1, top) - want).abs().max() + 1e-6
        try:
            torch.set_num_threads(1)
            for i in (0, 17, 39):
                assert torch.equal(det.logits(model, hidden[i : i + 1]), whole[i : i + 1])
                for world in (2, 3):
                    parts = [det.logits(model, hidden[i : i + 1], s) for s in invariant.vocab_slices(vocab, world)]
                    assert torch.equal(det.refine(model, torch.cat(parts, -1), hidden[i : i + 1]), whole[i : i + 1])
        finally:
            torch.set_num_threads(threads)


def test_merge_in_order_is_the_merge_unit_by_unit():
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(6, 3, 4, 8, generator=gen)
    lse = torch.randn(6, 3, 4, generator=gen) * 5
    lse[4:, 1] = float("-inf")  # a shorter row: its last units absent
    merge = canonical.OrderedMerge(3, 4, 8, o.device)
    for u in range(6):
        merge.add(0, o[u], lse[u])
    assert torch.equal(canonical.merge_in_order(o, lse), merge.result())


@pytest.mark.slow
def test_needle_in_bf16_same_bits_at_sp1_and_sp2():
    """The default model on the demo's needle prompt (cut to ~1,650 tokens), bf16: SP 1 in 1,024-token
    chunks and SP 2 in one give the same answer, tokens and logprobs (top 2 too: decode rows' vocabulary
    slices gathered whole before their top is refined), and the answer holds the needle.
    One thread per rank: two threads of one rank wait on each other on a loaded 2-core machine
    (SP 1 measured ~120 s against ~20 s on one)."""
    from seqpar.cli import demo

    doc = needle_document()
    params = SamplingParams(temperature=0.0, max_tokens=16, stop=["\n"], logprobs=2)
    outs = {}
    for sp, budget in ((1, 1024), (2, 2048)):
        with LLM(
            "smollm2-135m",
            sp_size=sp,
            dtype="bfloat16",
            kv_cache_gb=0.1,
            max_num_batched_tokens=budget,
            num_threads=1,
            enable_deterministic_inference=True,
        ) as llm:
            prompt = llm.chat_prompt(demo.conversation(doc))
            assert 1024 < len(prompt) <= 2048  # SP 1 in chunks, SP 2 in one
            outs[sp] = llm.generate([prompt], params)[0]
    assert demo.CODE in outs[1].outputs[0].text
    assert outs[2].outputs[0].text == outs[1].outputs[0].text
    assert _bits(outs[2]) == _bits(outs[1])


def test_served_request_same_bytes_alone_and_among_eight(tmp_path):
    """`seqpar serve --enable-deterministic-inference`: one request alone, then among 8 concurrent
    ones (different prompts, the same prefix), returns the same bytes (choices, usage)."""
    import asyncio
    import json

    import httpx

    from server_util import Server, save_tiny_chat_model

    path = save_tiny_chat_model(tmp_path)
    body = {"model": "tiny", "prompt": [BASE + [9, 4, 5]], "max_tokens": 4, "temperature": 0.8, "seed": 3}
    body.update(logprobs=2, echo=True, ignore_eos=True)
    others = [{**body, "prompt": [BASE[: 3 + i] + [60 + i] * i], "seed": i} for i in range(7)]
    flags = ["--sp", "2", "--kv-cache-gb", "0.01", "--max-model-len", "64", "--served-model-name", "tiny"]
    with Server("--model", path, *flags, "--max-num-batched-tokens", "7", "--enable-deterministic-inference") as s:

        def answer(r: httpx.Response) -> str:
            assert r.status_code == 200, r.text
            data = r.json()
            return json.dumps([data["choices"], data["usage"]], sort_keys=True)

        alone = answer(s.post("/v1/completions", json=body))

        async def together() -> list[str]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                replies = await asyncio.gather(
                    *(c.post("/v1/completions", json=b) for b in [*others[:4], body, *others[4:]])
                )
            return [answer(r) for r in replies]

        assert asyncio.run(together())[4] == alone
