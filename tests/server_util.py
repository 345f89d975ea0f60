"""Helpers for the server tests (no tests here): a tiny random model with a chat template,
a `seqpar serve` subprocess on a free port, its rank processes, and its /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seqpar.comm.launch import free_port
from test_model_helpers import VOCAB, tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
# Words w0..w100 are the tokens; the template wraps each message in w3 ... w4 and asks with w5.
CHAT_TEMPLATE = (
    "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)


def save_tiny_chat_model(path: Path, context: int = 256) -> str:
    """The engine tests' tiny Llama (12 q / 2 kv heads), with a word tokenizer and a chat template."""
    tiny_hf_model(
        "llama", seed=3, hidden_size=96, num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=context
    ).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)
    return str(path)


def save_tiny_bytelevel_model(path: Path, context: int = 256) -> str:
    """The tiny Llama with a byte-level BPE tokenizer of single bytes (GPT-2's byte symbols, no
    merges) and one special token: every character is at least one token, as with real models."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {sym: i for i, sym in enumerate(sorted(alphabet))} | {"<|end|>": len(alphabet)}
    tiny_hf_model(
        "llama",
        seed=3,
        vocab_size=len(vocab),
        eos_token_id=len(alphabet),
        hidden_size=96,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=context,
    ).save_pretrained(path)
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    hf_tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    hf_tok.save_pretrained(path)
    return str(path)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


class Server:
    """`python -m seqpar serve ...` on a free port; stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 120.0,
        launcher: tuple[str, ...] = (),
    ):
        """`launcher`: a command that runs `-m seqpar serve ...` for us, e.g. torchrun's."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w") if os.environ.get("SEQPAR_TEST_QUIET") else None
        self.proc = subprocess.Popen(
            [*(launcher or (sys.executable,)), "-m", "seqpar", "serve", "--port", str(self.port), *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.ready_line = self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> str:
        line = ""
        deadline = time.monotonic() + timeout

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready")
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, 0.2, "server ready")
        # The ready line is printed once uvicorn listens, i.e. before /health can answer.
        if self.proc.stdout is not None and time.monotonic() < deadline:
            line = self.proc.stdout.readline().strip()
        return line

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels without model_name): value}."""
        out = {}
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def rank_pids(self) -> list[int]:
        """The rank processes: the server's children started by multiprocessing's spawn."""
        return children(self.proc.pid, "spawn_main")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.log is not None:
            self.log.close()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def children(pid: int, needle: str = "") -> list[int]:
    """Live child processes of `pid` whose command line contains `needle` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            state = stat[stat.rindex(")") + 2 :].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if ppid == pid and state != "Z" and needle in cmd:
            out.append(int(entry.name))
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
