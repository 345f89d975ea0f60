"""The model's tokenizer, loaded on first need (vLLM's `skip_tokenizer_init`, decided by the files).

A model directory without tokenizer files still serves token-id prompts: outputs carry
token ids and empty text. Only what needs a tokenizer (a text prompt, a chat template,
stop strings, decoded log-prob tokens) asks for it, and then fails with one clear error.
"""

from __future__ import annotations

import threading
from typing import Any

from seqpar.model import ModelLoadError, load_tokenizer


class TokenizerUnavailableError(ValueError):
    """Something needs the model's tokenizer, and the model has none that loads."""


class LazyTokenizer:
    """Loads the tokenizer of `model` once, on the first `get` / `get_or_none`; a failure is
    remembered (it would fail the same way again) and said again at every `get`."""

    def __init__(self, model: str):
        self.model = model
        self._lock = threading.Lock()  # the server's handlers and the engine thread may ask at once
        self._loaded = False
        self._tokenizer: Any = None
        self._error = ""

    def get_or_none(self) -> Any | None:
        with self._lock:
            if not self._loaded:
                try:
                    self._tokenizer = load_tokenizer(self.model)
                except ModelLoadError as e:
                    # transformers' reasons run over several lines; the first says what failed.
                    self._error = str(e).strip().splitlines()[0]
                self._loaded = True
        return self._tokenizer

    def get(self, need: str = "working with text") -> Any:
        """The tokenizer, or TokenizerUnavailableError saying that `need` needs one, why there is
        none (the loader's reason names the model's path), and what works without it."""
        tokenizer = self.get_or_none()
        if tokenizer is None:
            raise TokenizerUnavailableError(
                f"{need} needs the model's tokenizer, which is unavailable: {self._error}; send prompts as "
                "token-id lists, or add tokenizer.json/tokenizer_config.json to the model directory"
            )
        return tokenizer
