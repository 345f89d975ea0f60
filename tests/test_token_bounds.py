"""The characters-per-token bound that lets the server refuse a text by its length: it exists only
for tokenizers that spell every character out, and then no text has fewer tokens than it says."""

from __future__ import annotations

import unicodedata

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seqpar.engine.token_bounds import NFC_MAX_COMPOSED, TokenBound, _byte_symbols, token_bound

# Texts that make few tokens of many characters: runs of a long token, of spaces, of control
# characters, of characters that compose under NFC, of a special token.
TEXTS = [
    "hello world " * 50,
    "aaaa" * 100,
    " " * 300,
    "\x04\x06" * 200 + "ab",
    "e\u0301" * 100 + "\u1100\u1161\u11a8" * 50,
    "\u03b1\u0313\u0300\u0345" * 40,
    "<|end|>" * 60,
    "日本語のテキスト😀" * 30,
]


def _fast(tok: Tokenizer, **kw) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def byte_level(drop: str = "", normalizer=None) -> PreTrainedTokenizerFast:
    symbols = _byte_symbols()
    dropped = {symbols[ord(c)] for c in drop}
    vocab = {sym: i for i, sym in enumerate(s for s in symbols.values() if s not in dropped)}
    vocab["aa"], vocab["aaaa"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab, [("a", "a"), ("aa", "aa")]))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|end|>"])
    return _fast(tok)


def byte_fallback() -> PreTrainedTokenizerFast:
    """Llama 2's shape: SentencePiece BPE with byte fallback, '▁' for spaces."""
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "▁ab", "e"]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [("▁", "a"), ("▁a", "b")], byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _fast(tok)


def word_level(pre_tokenizer=None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({"w0": 0, "w1": 1}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Whitespace()
    return _fast(tok, unk_token="w0")


def test_nfc_composes_at_most_the_longest_canonical_decomposition():
    assert max(len(unicodedata.normalize("NFD", chr(c))) for c in range(0x110000)) <= NFC_MAX_COMPOSED


@pytest.mark.parametrize(
    "make",
    [
        byte_level,
        lambda: byte_level(drop="\x04\x06"),
        lambda: byte_level(normalizer=normalizers.NFC()),
        lambda: byte_level(normalizer=normalizers.NFKC()),
        byte_fallback,
    ],
    ids=["byte-level", "byte-level-missing-controls", "byte-level-nfc", "byte-level-nfkc", "byte-fallback"],
)
def test_no_text_has_fewer_tokens_than_the_bound_says(make):
    tok = make()
    bound = token_bound(tok)
    assert bound is not None
    for text in TEXTS:
        n = len(tok.encode(text, add_special_tokens=False))
        counted = bound.counted(text, 10**9)
        assert n * bound.chars >= counted, (text[:20], n, counted, bound)
        decoded = tok.decode(tok.encode(text, add_special_tokens=False))
        assert len(decoded) <= n * bound.chars


def test_missing_control_bytes_are_not_counted():
    tok = byte_level(drop="\x04\x06")
    bound = token_bound(tok)
    assert bound == TokenBound(bound.chars, "\x04\x06")
    assert tok.encode("\x04" * 100, add_special_tokens=False) == []  # why they cannot count
    assert bound.counted("\x04" * 100 + "abc", 10) == 3
    assert bound.counted("x" * 1000, 10) == 11  # stops once over `enough`
    assert token_bound(byte_level(drop="\x04", normalizer=normalizers.NFC())) is None


@pytest.mark.parametrize(
    "make",
    [
        word_level,  # an unknown word of any length is one token
        lambda: word_level(pre_tokenizers.WhitespaceSplit()),
        lambda: byte_level(normalizer=normalizers.Strip()),  # drops spaces
        lambda: byte_level(normalizer=normalizers.StripAccents()),  # drops combining marks
        lambda: byte_level(normalizer=normalizers.Replace("  ", " ")),  # shrinks
        lambda: byte_level(drop="\x80"),  # a continuation byte missing: a whole character may vanish
    ],
    ids=["word-level", "whitespace-split", "strip", "strip-accents", "replace-shrinks", "missing-continuation"],
)
def test_no_bound_where_text_can_vanish(make):
    assert token_bound(make()) is None


def test_no_bound_with_an_added_token_that_swallows_whitespace():
    tok = byte_level()
    tok.add_tokens([AddedToken("<mask>", lstrip=True)])
    assert len(tok.encode(" " * 100 + "<mask>", add_special_tokens=False)) == 1
    assert token_bound(tok) is None
