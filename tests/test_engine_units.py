"""Single-process engine pieces: paged KV cache, sampler, detokenizer / stop rules, scheduler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seqpar.engine.detokenize import IncrementalDetokenizer, decode_logprobs
from seqpar.engine.kv_cache import CacheFullError, PagedKVCache, blocks_needed, size_cache
from seqpar.engine.outputs import Logprob
from seqpar.engine.sampling import Sampler, SamplingParams, filter_logits, make_generator, prompt_logprobs
from seqpar.engine.scheduler import RequestTooLongError, Scheduler, Sequence, SequenceStatus


# ---------------------------------------------------------------- KV cache
def _state(cache: PagedKVCache) -> tuple:
    return (list(cache._free), {s: cache.block_table(s) for s in cache.seq_ids},
            {s: cache.local_len(s) for s in cache.seq_ids})


def _check_invariants(cache: PagedKVCache) -> None:
    owned = [b for s in cache.seq_ids for b in cache.block_table(s)]
    assert len(owned) == len(set(owned)), "a block is shared between live sequences"
    assert not set(owned) & set(cache._free), "a block is both owned and free"
    assert sorted(owned + list(cache._free)) == list(range(cache.num_blocks))
    for s in cache.seq_ids:
        assert cache.local_len(s) <= len(cache.block_table(s)) * cache.block_size


ops = st.lists(st.tuples(st.sampled_from(["reserve", "append", "free"]), st.integers(0, 5), st.integers(0, 40)),
               max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 12), block_size=st.integers(1, 8))
def test_cache_invariants(ops, num_blocks, block_size):
    cache = PagedKVCache(1, num_blocks, block_size, 1, 2)
    for op, seq, n in ops:
        if op == "reserve":
            before = _state(cache)
            ok = cache.can_allocate({seq: n})
            try:
                cache.reserve(seq, n)
                assert ok
            except CacheFullError:
                assert not ok and _state(cache) == before
        elif op == "append" and seq in cache.seq_ids:
            room = len(cache.block_table(seq)) * block_size - cache.local_len(seq)
            cache.append_positions(seq, list(range(min(n, room))))
        elif op == "free" and seq in cache.seq_ids:
            cache.free(seq)
        _check_invariants(cache)
    for seq in cache.seq_ids:
        cache.free(seq)
    assert cache.num_free_blocks == num_blocks and cache.bytes_used() == 0


def test_reserve_failure_changes_nothing():
    cache = PagedKVCache(2, 4, 4, 1, 2)
    cache.reserve(0, 9)  # 3 blocks
    before = _state(cache)
    assert not cache.can_allocate({1: 5})
    with pytest.raises(CacheFullError, match="needs 2 more blocks but only 1"):
        cache.reserve(1, 5)
    with pytest.raises(CacheFullError):  # all-or-nothing: seq 2 alone would fit
        cache.reserve_many({2: 4, 3: 4})
    assert _state(cache) == before and 1 not in cache.seq_ids and 2 not in cache.seq_ids
    cache.append_positions(0, list(range(9)))
    with pytest.raises(CacheFullError, match="reserve"):
        cache.append_positions(0, list(range(4)))  # only 3 reserved slots left
    with pytest.raises(KeyError, match="reserve"):
        cache.gather(0, 7)


def test_gather_returns_writes_in_order():
    torch.manual_seed(0)
    L, Hkv, D, bs = 2, 3, 4, 4
    cache = PagedKVCache(L, 16, bs, Hkv, D)
    # Two sequences growing interleaved, with non-contiguous global positions (zigzag / round-robin).
    pos = {0: [0, 1, 2, 9, 10, 11, 14], 1: [3, 4, 20, 21, 22, 23, 24, 25, 40]}
    steps = [{0: 3, 1: 2}, {0: 3, 1: 6}, {0: 1, 1: 1}]
    ref_k = {s: [[] for _ in range(L)] for s in pos}
    done = {0: 0, 1: 0}
    for step in steps:
        cache.reserve_many(step)
        for s, n in step.items():
            cache.append_positions(s, pos[s][done[s]:done[s] + n])
            done[s] += n
        slots = cache.slot_mapping(list(step), list(step.values()))
        assert slots.unique().numel() == slots.numel()
        for layer in range(L):
            k = torch.randn(len(slots), Hkv, D)
            cache.write(layer, slots, k, -k)
            off = 0
            for s, n in step.items():
                ref_k[s][layer].append(k[off:off + n])
                off += n
    cache.reserve(2, 0)  # a sequence this rank holds no token of
    for layer in range(L):
        for s in pos:
            k, v, p = cache.gather(layer, s)
            torch.testing.assert_close(k, torch.cat(ref_k[s][layer]), rtol=0, atol=0)
            torch.testing.assert_close(v, -k, rtol=0, atol=0)
            assert p.tolist() == pos[s]
        k, v, idx, p = cache.gather_batch(layer, [1, 2, 0])
        assert idx.tolist() == [0] * 9 + [2] * 7 and p.tolist() == pos[1] + pos[0]
        torch.testing.assert_close(k, torch.cat([cache.gather(layer, 1)[0], cache.gather(layer, 0)[0]]))
        assert cache.gather(layer, 2)[0].shape == (0, Hkv, D)
    with pytest.raises(ValueError, match=r"\[n, Hkv, D\]"):
        cache.write(0, slots, torch.zeros(len(slots), Hkv + 1, D), torch.zeros(len(slots), Hkv + 1, D))


def test_cache_sizing():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    per_block = 2 * 3 * 16 * 2 * 8 * 4 + 16 * 8  # K+V fp32 over 3 layers, plus int64 positions
    assert size_cache(3, 2, 8, torch.float32, 10 * per_block + 7, 16) == 10
    cache = PagedKVCache(3, 10, 16, 2, 8)
    assert cache.capacity_bytes() == 10 * per_block
    cache.reserve(5, 17)
    assert cache.bytes_used() == 2 * per_block and cache.num_free_blocks == 8
    with pytest.raises(ValueError, match="smaller block_size"):
        size_cache(3, 2, 8, torch.float32, per_block - 1, 16)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVCache(1, 0, 16, 1, 8)


# ---------------------------------------------------------------- sampling
def test_sampling_params_validation():
    p = SamplingParams(stop="x", stop_token_ids=None)
    assert p.stop == ["x"] and p.stop_token_ids == []
    for bad, match in [({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
                       ({"max_tokens": 0}, "max_tokens"), ({"logprobs": -1}, "logprobs"), ({"stop": [""]}, "stop")]:
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
@given(seed=st.integers(0, 10_000), top_k=st.sampled_from([-1, 0, 1, 3, 10, 40]),
       top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_top_k_top_p_match_reference(seed, top_k, top_p, temperature):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 32, generator=gen) * 3
    masked = filter_logits(logits, torch.full((2,), temperature), torch.tensor([top_k, top_k]),
                           torch.tensor([top_p, top_p]))
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
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0)]
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


# ---------------------------------------------------------------- scheduler
def _seq(rid: str, n: int, **params) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(**params))


def test_scheduler_fcfs_admission_and_join_between_decodes():
    budget = {"tokens": 100}

    def fits(batch: list[Sequence]) -> bool:  # a cache that reserves prompt + max_tokens up front
        used = sum(s.max_total_tokens for s in sched.running)
        return used + sum(s.max_total_tokens for s in batch) <= budget["tokens"]

    sched = Scheduler(max_num_seqs=3, max_num_batched_tokens=30, fits=fits, max_tokens_ever=100)
    a, b, c, d = _seq("a", 20, max_tokens=10), _seq("b", 15, max_tokens=10), _seq("c", 5), _seq("d", 1)
    for s in (a, b, c, d):
        sched.add(s)
    kind, seqs = sched.schedule()
    assert kind == "prefill" and seqs == [a]  # b would push the batch past 30 prompt tokens
    kind, seqs = sched.schedule()
    assert kind == "prefill" and seqs == [b, c]  # 30 + 25 + 21 = 76 <= 100; d: max_num_seqs=3
    assert all(s.status is SequenceStatus.RUNNING for s in (a, b, c)) and d.status is SequenceStatus.WAITING
    assert sched.schedule() == ("decode", [a, b, c])
    sched.finish(b)
    assert b.status is SequenceStatus.FINISHED
    e = _seq("e", 3)
    sched.add(e)
    assert sched.schedule() == ("prefill", [d])  # joins between decode steps; e waits for a free seat
    assert sched.schedule() == ("decode", [a, c, d])
    sched.finish(a)
    assert sched.schedule() == ("prefill", [e])
    assert sched.schedule() == ("decode", [c, d, e])


def test_scheduler_fcfs_blocks_behind_a_big_request_and_admits_it_alone():
    room = {"free": 40}
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=16,
                      fits=lambda batch: sum(s.max_total_tokens for s in batch) <= room["free"], max_tokens_ever=64)
    small, big, tiny = _seq("s", 4, max_tokens=4), _seq("big", 40, max_tokens=20), _seq("t", 1, max_tokens=1)
    for s in (small, big, tiny):
        sched.add(s)
    assert sched.schedule() == ("prefill", [small])
    room["free"] = 10
    assert sched.schedule() == ("decode", [small])  # big does not fit; tiny must not overtake it
    sched.finish(small)
    room["free"] = 64
    # Alone, big runs although its 40 prompt tokens exceed max_num_batched_tokens (no chunked prefill).
    assert sched.schedule() == ("prefill", [big])
    assert big.max_total_tokens == 60


def test_never_fitting_requests_are_rejected():
    sched = Scheduler(4, 64, fits=lambda batch: sum(s.max_total_tokens for s in batch) <= 32, max_tokens_ever=48)
    with pytest.raises(RequestTooLongError, match="49 tokens.*at most 48"):
        sched.add(_seq("long", 49))
    assert not sched.has_unfinished()
    capped = _seq("capped", 40, max_tokens=None)
    sched.add(capped)
    assert capped.max_total_tokens == 48
    # fits() says no on an empty cache: an error naming the request, not an endless wait.
    with pytest.raises(RequestTooLongError, match="capped") as err:
        sched.schedule()
    assert err.value.seq is capped and capped.is_finished and sched.schedule() == ("idle", [])
    with pytest.raises(ValueError, match="no tokens"):
        Sequence("empty", [])
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(0, 64, fits=lambda b: True, max_tokens_ever=48)
    r = _seq("r", 2)
    sched.add(r)
    assert sched.abort("r") == [r] and r.is_finished and not sched.has_unfinished()
