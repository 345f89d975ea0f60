"""How many characters one token can stand for: the bound that lets a text be refused by its
length alone, before it is tokenized.

If no token stands for more than c characters of a text, a text of n characters has at least
n / c tokens, so one of more than L * c characters cannot fit a context of L tokens. Such a c
exists when nothing in the tokenizer's pipeline can turn a long stretch of text into few tokens;
`token_bound` checks that from the tokenizer's own description (tokenizer.json):

- normalizing shrinks the text by at most a known factor. None, Prepend, Lowercase, NFD, NFKD,
  ByteLevel and Replace of a string by one at least as long never shrink it; NFC and NFKC compose
  at most NFC_MAX_COMPOSED characters into one (NFD(s) is no shorter than s, and each character
  of NFC(s) decomposes back into at most that many). Strip, StripAccents, Nmt, BertNormalizer and
  Precompiled (SentencePiece's) may drop any number of characters: no bound.
- pre-tokenizing drops nothing: ByteLevel, Metaspace, Digits, and Split and Punctuation unless
  their behavior is 'removed'. Whitespace, WhitespaceSplit, BertPreTokenizer and
  CharDelimiterSplit drop whitespace: no bound.
- the model spells every character out: BPE or Unigram with byte fallback and all 256 <0xNN>
  tokens, or byte-level BPE or Unigram whose vocabulary holds the 64 continuation-byte symbols
  (every non-ASCII character has one). A byte-level vocabulary may lack some ASCII bytes (SmolLM2's
  lacks six control characters): those characters become no token at all, so they are not
  counted (`uncounted`), and then the normalizer must be None. Otherwise an unknown character is
  dropped or becomes one unknown token for a whole run, and WordLevel and WordPiece make a whole
  unknown word one token: no bound.
- an added token does not take the whitespace around it along (lstrip, rstrip): no bound.

Then one token covers at most W counted characters of the normalized text, W the longest string
in the vocabulary or among the added tokens (a byte symbol is one byte, so at most one character; <0xNN>
is one byte; a continuing-subword prefix only makes W larger), so c = W * shrink. Decoding gives
each token at most W + 1 characters (the + 1: a word-separating space) for the decoders allowed
below, so c = max(W * shrink, W + 1) also bounds the text a context of L tokens can generate:
a stop string longer than L * c can never match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The longest canonical decomposition of any character (U+1F82 GREEK SMALL LETTER ALPHA WITH
# PSILI AND VARIA AND YPOGEGRAMMENI -> 4); a test checks it against unicodedata.
NFC_MAX_COMPOSED = 4

_KEEPS_LENGTH = {"Prepend", "Lowercase", "NFD", "NFKD", "ByteLevel"}
_KEEPS_CHARS = {"ByteLevel", "Metaspace", "Digits"}
_DECODERS = {"ByteLevel", "Metaspace", "ByteFallback", "Fuse", "Strip", "WordPiece", "BPEDecoder"}
_BYTE_FALLBACK = [f"<0x{b:02X}>" for b in range(256)]


def _parts(node: dict | None, key: str) -> list[dict]:
    """A pipeline stage as a flat list of steps (a 'Sequence' unrolled; None: no steps)."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node[key] for step in _parts(child, key)]
    return [node]


def _shrink(normalizer: dict | None) -> int | None:
    """The factor by which the normalizer may shrink a text, or None if unbounded."""
    factor = 1
    for step in _parts(normalizer, "normalizers"):
        kind = step.get("type")
        if kind in ("NFC", "NFKC"):
            factor = NFC_MAX_COMPOSED
        elif kind == "Replace":
            pattern = step.get("pattern", {}).get("String")
            if pattern is None or len(step.get("content", "")) < len(pattern):
                return None
        elif kind not in _KEEPS_LENGTH:
            return None
    return factor


def _keeps_chars(pre_tokenizer: dict | None) -> bool:
    for step in _parts(pre_tokenizer, "pretokenizers"):
        kind = step.get("type")
        if kind in ("Split", "Punctuation"):
            if str(step.get("behavior", "")).lower() == "removed":
                return False
        elif kind not in _KEEPS_CHARS:
            return False
    return True


def _decodes_short(decoder: dict | None) -> bool:
    for step in _parts(decoder, "decoders"):
        kind = step.get("type")
        if kind == "Replace":
            pattern = step.get("pattern", {}).get("String")
            if pattern is None or len(step.get("content", "")) > len(pattern):
                return False
        elif kind not in _DECODERS:
            return False
    return True


def _vocab(model: dict) -> list[str]:
    vocab = model.get("vocab") or {}
    return list(vocab) if isinstance(vocab, dict) else [piece for piece, _ in vocab]  # Unigram: [piece, score]


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte's printable stand-in character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def _uncounted(model: dict, vocab: set[str], byte_level: bool) -> str | None:
    """The characters that may become no token, or None if the model does not spell text out."""
    if model.get("type") not in ("BPE", "Unigram"):
        return None
    if byte_level:
        symbols = _byte_symbols()
        if any(symbols[b] not in vocab for b in range(0x80, 0xC0)):
            return None
        return "".join(chr(b) for b in range(0x80) if symbols[b] not in vocab)
    return "" if model.get("byte_fallback") and set(_BYTE_FALLBACK) <= vocab else None


@dataclass(frozen=True)
class TokenBound:
    """No token stands for more than `chars` characters, encoding or decoding; characters in
    `uncounted` may become no token at all, so they do not count toward a text's length."""

    chars: int
    uncounted: str = ""

    def counted(self, text: str, enough: int) -> int:
        """The characters of `text` that count, or a number above `enough` once that many do."""
        if not self.uncounted:
            return len(text)
        total, step = 0, enough + 1
        for start in range(0, len(text), step):  # piecewise: a long text is settled by its start
            piece = text[start : start + step]
            total += len(piece) - sum(piece.count(c) for c in self.uncounted)
            if total > enough:
                break
        return total


def token_bound(tokenizer: Any) -> TokenBound | None:
    """The bound on characters per token (see the module's docstring), or None where there is none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python ("slow") tokenizer: its pipeline is code, not a description
        return None
    spec = json.loads(backend.to_str())
    shrink = _shrink(spec.get("normalizer"))
    added = spec.get("added_tokens") or []
    if shrink is None or not _keeps_chars(spec.get("pre_tokenizer")) or not _decodes_short(spec.get("decoder")):
        return None
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    model = spec.get("model") or {}
    vocab = _vocab(model)
    steps = _parts(spec.get("normalizer"), "normalizers") + _parts(spec.get("pre_tokenizer"), "pretokenizers")
    uncounted = _uncounted(model, set(vocab), any(step.get("type") == "ByteLevel" for step in steps))
    if uncounted is None or (uncounted and spec.get("normalizer") is not None):
        return None
    widest = max((len(s) for s in vocab + [t.get("content", "") for t in added]), default=1)
    return TokenBound(max(widest * shrink, widest + 1), uncounted)
