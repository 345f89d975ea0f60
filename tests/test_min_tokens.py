"""min_tokens (vLLM's extra sampling field): before that many output tokens, EOS, stop
token ids and stop strings end nothing; length limits still do."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seqpar.engine.detokenize import IncrementalDetokenizer
from seqpar.engine.sampling_params import SamplingParams

HELLO, WORLD, FOO, EOS = 2, 3, 4, 0


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": EOS, "<unk>": 1, "hello": HELLO, "world": WORLD, "foo": FOO}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>")


def run(tok, params: SamplingParams, ids: list[int], **kw) -> tuple[IncrementalDetokenizer, int, str]:
    d = IncrementalDetokenizer(tok, params, eos_token_id=EOS, **kw)
    streamed = ""
    for n in range(1, len(ids) + 1):
        streamed += d.update(ids[:n])
        if d.finished:
            return d, n, streamed
    return d, len(ids), streamed


def test_min_tokens_defers_eos_stop_ids_and_stop_strings(tok):
    d, n, _ = run(tok, SamplingParams(min_tokens=3), [HELLO, EOS, WORLD, EOS, FOO])
    assert (d.finish_reason, n, d.text) == ("stop", 4, "hello world")  # the early EOS is kept, not shown
    d, n, _ = run(tok, SamplingParams(min_tokens=2, stop_token_ids=[FOO]), [FOO, FOO, HELLO])
    assert (d.finish_reason, d.stop_reason, n) == ("stop", FOO, 2)
    d, n, streamed = run(tok, SamplingParams(min_tokens=3, stop=["world"]), [WORLD, HELLO, WORLD, FOO])
    assert (d.finish_reason, n, d.text) == ("stop", 3, "world hello ") and streamed == d.text
    # the token that reaches min_tokens may end the completion itself
    d, n, _ = run(tok, SamplingParams(min_tokens=2), [HELLO, EOS, WORLD])
    assert (d.finish_reason, n, d.text) == ("stop", 2, "hello")


def test_min_tokens_never_outlives_the_context(tok):
    d, n, _ = run(
        tok, SamplingParams(min_tokens=10, max_tokens=None), [HELLO] * 10, num_prompt_tokens=5, max_model_len=8
    )
    assert (d.finish_reason, n) == ("length", 3)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(min_tokens=-1), "min_tokens must be an int >= 0"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens=5 exceeds max_tokens=4"),
    ],
)
def test_min_tokens_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)
