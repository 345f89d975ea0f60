"""Single-process engine pieces: paged KV cache, sampler, detokenizer / stop rules, scheduler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seqpar.engine.detokenize import IncrementalDetokenizer, decode_logprobs
from seqpar.engine.outputs import Logprob
from seqpar.engine.sampling import Sampler, filter_logits, make_generator, prompt_logprobs
from seqpar.engine.sampling_params import SamplingParams


# ---------------------------------------------------------------- sampling
def test_sampling_params_validation():
    p = SamplingParams(stop="x", stop_token_ids=None)
    assert p.stop == ["x"] and p.stop_token_ids == []
    for bad, match in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


def test_greedy_is_argmax_lowest_id_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    logits[2, [7, 3, 30]] = 100.0  # tie: lowest id (3) must win
    out = Sampler()(logits, [SamplingParams(temperature=0.0)] * 5)
    assert out.token_ids == logits.argmax(-1).tolist() and out.token_ids[2] == 3
    torch.testing.assert_close(torch.tensor(out.logprobs), logits.log_softmax(-1).max(-1).values)


def test_seeded_sampling_reproducible_regardless_of_batch():
    torch.manual_seed(0)
    row = torch.randn(1, 100)
    p = SamplingParams(temperature=1.3, top_p=0.9, seed=1234)

    def run(batch_size: int, other_seed: int | None) -> list[int]:
        gen = make_generator(p.seed)
        others = SamplingParams(temperature=1.0, seed=other_seed)
        sampler, toks = Sampler(seed=batch_size), []
        for _ in range(20):
            logits = torch.cat([torch.randn(batch_size, 100), row])
            params = [others] * batch_size + [p]
            gens = [make_generator(other_seed) for _ in range(batch_size)] + [gen]
            toks.append(sampler(logits, params, gens).token_ids[-1])
        return toks

    first = run(0, None)
    assert run(3, None) == first and run(5, 7) == first
    assert len(set(first)) > 1  # it really samples


def _reference_filter(logits: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    """Plain-Python allowed set: temperature, top-k, then the smallest top-p nucleus."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
    if top_k > 0:
        order = order[:top_k]
    mx = max(scaled[i] for i in order)
    z = sum(pow(2.718281828459045, scaled[i] - mx) for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p and top_p < 1.0:
            break
        kept.append(i)
        mass += pow(2.718281828459045, scaled[i] - mx) / z
    return set(kept)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    top_k=st.sampled_from([-1, 0, 1, 3, 10, 40]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_top_k_top_p_match_reference(seed, top_k, top_p, temperature):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 32, generator=gen) * 3
    masked = filter_logits(
        logits, torch.full((2,), temperature), torch.tensor([top_k, top_k]), torch.tensor([top_p, top_p])
    )
    for b in range(2):
        kept = set(torch.nonzero(torch.isfinite(masked[b])).flatten().tolist())
        assert kept == _reference_filter(logits[b].tolist(), temperature, top_k, top_p)
        torch.testing.assert_close(masked[b][list(kept)], logits[b][list(kept)] / temperature)


def test_sampled_tokens_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    out = Sampler(seed=0)(logits, [SamplingParams(top_k=3)] * 4000)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / 4000
    # top-k=3 renormalises (0.5, 0.3, 0.15) / 0.95; 4000 draws give std < 0.008 per bin.
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.03, rtol=0)


def test_logprob_dicts():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0),
    ]
    out = Sampler()(logits, params)
    lsm = logits.log_softmax(-1)
    d0 = out.top_logprobs[0]
    assert list(d0) == lsm[0].topk(3).indices.tolist() and [lp.rank for lp in d0.values()] == [1, 2, 3]
    for tid, lp in d0.items():
        assert lp.logprob == pytest.approx(lsm[0, tid].item())
    assert list(out.top_logprobs[1]) == [out.token_ids[1]] and out.top_logprobs[1][out.token_ids[1]].rank == 1
    assert out.top_logprobs[2] is None


def test_prompt_logprobs_structure():
    torch.manual_seed(0)
    ids = [5, 1, 9, 9, 0, 3]
    logits = torch.randn(len(ids), 12)
    logits[2, 9] = -20.0  # the actual next token is unlikely: it must still be reported, with its rank
    res = prompt_logprobs(logits, ids, 2)
    assert len(res) == len(ids) and res[0] is None
    lsm = logits.log_softmax(-1)
    for t in range(1, len(ids)):
        d = res[t]
        assert ids[t] in d and len(d) in (2, 3)
        assert d[ids[t]].logprob == pytest.approx(lsm[t - 1, ids[t]].item())
        assert d[ids[t]].rank == int((lsm[t - 1] > lsm[t - 1, ids[t]]).sum()) + 1
        top2 = lsm[t - 1].topk(2).indices.tolist()
        assert all(tid in d for tid in top2)
    assert res[3][9].rank == 12
    assert prompt_logprobs(logits[:-1], ids, 0)[1:] == [{ids[t]: res[t][ids[t]]} for t in range(1, len(ids))]


# ---------------------------------------------------------------- detokenizer and stop rules
@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "<unk>": 1, "hello": 2, "world": 3, "foo": 4, "bar": 5, "baz": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every UTF-8 byte is a token, so 'é' takes two."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|eos|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def _run(tok, params, ids, **kw) -> tuple[IncrementalDetokenizer, list[str], int]:
    """Feed ids one at a time as an engine would; returns the detokenizer, deltas, ids consumed."""
    detok = IncrementalDetokenizer(tok, params, eos_token_id=tok.eos_token_id, **kw)
    deltas, out = [], []
    for t in ids:
        out.append(t)
        deltas.append(detok.update(out))
        if detok.finished:
            break
    return detok, deltas, len(out)


def test_stop_string_truncates_and_is_never_streamed(word_tok):
    ids = word_tok.encode("hello world foo bar baz", add_special_tokens=False)
    d, deltas, n = _run(word_tok, SamplingParams(stop=["zzz", "o b"], max_tokens=50), ids)
    assert (d.finish_reason, d.stop_reason, d.text, n) == ("stop", "o b", "hello world fo", 4)
    assert "".join(deltas) == d.text
    out = d.output(ids[:n], cumulative_logprob=-1.5)
    assert out.finished() and out.token_ids == ids[:4] and out.text == "hello world fo"


def test_stop_ids_eos_ignore_eos_and_length(word_tok):
    hello, world, foo, eos = 2, 3, 4, word_tok.eos_token_id
    d, _, n = _run(word_tok, SamplingParams(stop_token_ids=[foo]), [hello, world, foo, hello])
    assert (d.finish_reason, d.stop_reason, d.text, n) == ("stop", foo, "hello world", 3)
    d, _, n = _run(word_tok, SamplingParams(), [hello, eos, world])
    assert (d.finish_reason, d.stop_reason, d.text, n) == ("stop", None, "hello", 2)
    d, _, n = _run(word_tok, SamplingParams(ignore_eos=True, max_tokens=3), [hello, eos, world, foo])
    assert (d.finish_reason, d.text, n) == ("length", "hello world", 3)
    d, _, n = _run(word_tok, SamplingParams(max_tokens=None), [hello] * 10, num_prompt_tokens=5, max_model_len=8)
    assert (d.finish_reason, n) == ("length", 3)
    # A stop string completed by the last allowed token still wins over 'length', as in vLLM.
    d, _, _ = _run(word_tok, SamplingParams(max_tokens=2, stop=["world"]), [hello, world])
    assert (d.finish_reason, d.stop_reason, d.text) == ("stop", "world", "hello ")
    with pytest.raises(RuntimeError, match="finished"):
        d.update([hello, world, foo])


def test_incomplete_utf8_is_held_back(byte_tok):
    ids = byte_tok.encode("café au lait", add_special_tokens=False)
    d, deltas, _ = _run(byte_tok, SamplingParams(max_tokens=len(ids)), ids)
    assert d.text == "café au lait" and "".join(deltas) == d.text
    assert all("\ufffd" not in x for x in deltas) and deltas[3] == ""  # half of 'é'
    entries = [{ids[0]: Logprob(-0.1, 1)}, None]
    decode_logprobs(byte_tok, entries)
    assert entries[0][ids[0]].decoded_token == "c"


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1, max_size=80))
def test_incremental_detokenization_equals_decoding_the_whole_output(text):
    """A window per step gives the text of decoding everything at once (byte-level BPE,
    multi-byte characters split over tokens, spaces)."""
    tok = _smollm2_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        return
    d = IncrementalDetokenizer(tok, SamplingParams(max_tokens=len(ids)), None)
    streamed = "".join(d.update(ids[:i]) for i in range(1, len(ids) + 1))
    assert streamed == d.text == tok.decode(ids, skip_special_tokens=True)


_TOKENIZERS: dict = {}


def _smollm2_tokenizer():
    from seqpar.model import load_tokenizer

    if "smollm2" not in _TOKENIZERS:
        _TOKENIZERS["smollm2"] = load_tokenizer("smollm2-135m")
    return _TOKENIZERS["smollm2"]


# ---------------------------------------------------------------- packing cached K/V
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 90), st.integers(1, 9)), min_size=1, max_size=80))
def test_pack_of_slot_ranges_equals_a_gather(spans):
    """Few long ranges are sliced, many short ones gathered: either way the rows of the slots."""
    from seqpar.strategies.over_cache import CachedKeys, pack

    kh, vh = torch.randn(3, 100, 4), torch.randn(3, 100, 4)
    ranges = [(a, a + n) for a, n in spans]
    idx = torch.cat([torch.arange(a, b) for a, b in ranges])
    packed = pack(kh, vh, CachedKeys([], [], ranges))
    assert torch.equal(packed, torch.stack([kh[:, idx], vh[:, idx]]))


@pytest.mark.parametrize("strategy", ["ring", "pass_q", "allgather"])
def test_chunk_over_a_scattered_cache_is_exact(strategy):
    """A chunk's queries over a prefix whose blocks lie scattered in storage (more stretches
    than are worth one kernel call each: pass-Q packs them first), at one rank, against the
    dense reference."""
    from seqpar import TokenLayout, reference_attention
    from seqpar.kernels.layout import Run
    from seqpar.strategies.over_cache import CachedKeys, attention_over_cache

    n, bs, chunk, hq, hkv, d = 200, 2, 20, 6, 2, 8
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randperm(3 * n // bs, generator=gen)[: n // bs].tolist()  # block i -> storage block
    kh, vh = torch.randn(hkv, 3 * n, d, generator=gen), torch.randn(hkv, 3 * n, d, generator=gen)
    q = torch.randn(chunk, hq, d, generator=gen)
    runs = [Run(b * bs, bs, 0, i * bs, 1) for i, b in enumerate(blocks)]
    ranges = [(b * bs, b * bs + bs) for b in blocks]
    keys = CachedKeys([TokenLayout.from_runs(runs)], [TokenLayout.build([0] * n, list(range(n)))], ranges)
    assert len(keys.slot_ranges) > 64
    q_layout = TokenLayout.build([0] * chunk, list(range(n - chunk, n)))
    out = attention_over_cache(q, [q_layout], kh, vh, keys, None, strategy, None)
    slots = torch.tensor([s for a, b in ranges for s in range(a, b)])
    k, v = kh[:, slots].transpose(0, 1), vh[:, slots].transpose(0, 1)
    ref, _ = reference_attention(q, k, v, q_layout, TokenLayout.build([0] * n, list(range(n))), True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_huge_temperature_samples_and_infinite_is_refused():
    """A temperature past fp32's range (a fuzzed request) once made every probability nan and took
    the rank down; it samples (near-uniformly) now, and an infinite one is a clear error."""
    out = Sampler()(
        torch.randn(2, 50), [SamplingParams(temperature=1e39), SamplingParams(temperature=1e300)], None, [[3], []]
    )
    assert all(0 <= t < 50 and t != 3 for t in out.token_ids[:1]) and 0 <= out.token_ids[1] < 50
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("inf"))
