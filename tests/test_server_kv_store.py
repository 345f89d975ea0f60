"""`seqpar serve --kv-store-dir` through the real `openai` client: a prompt prefilled by one server is
loaded by the next (same tokens and log-probs, usage and /metrics say how many tokens came from the
store), and a server killed with SIGKILL while its ranks write leaves nothing a new server would
serve wrongly: torn files are counted misses and recomputed, dead writers' temporaries are swept.

Deterministic fp32 on the tiny model: a prefix loaded from disk gives the bits of the run that
computed it, so tokens and log-probs are compared exactly. Prompts are token ids (the word
tokenizer's ids), so the tests can name the block files by their chained hashes.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import openai
import pytest

from seqpar.engine.block_manager import chain_hash
from server_util import Server, alive, save_tiny_chat_model, wait_until
from test_model_helpers import VOCAB

pytestmark = pytest.mark.timeout(180)
BS = 16
ARGS = ("--kv-cache-gb", "0.01", "--max-model-len", "256", "--dtype", "float32", "--enable-deterministic-inference")
ARGS += ("--block-size", str(BS), "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


def _prompt(seed: int, n: int = 200) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, VOCAB) for _ in range(n)]


def _ask(server: Server, prompt: list[int]):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    out = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    c = out.choices[0]
    return (c.text, c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs), out.usage


def _block_file(store: Path, prompt: list[int], i: int) -> Path | None:
    """The file of the prompt's block i (in whichever fingerprint and rank folder), or None."""
    h = None
    for j in range(i + 1):
        h = chain_hash(h, prompt[j * BS : (j + 1) * BS])
    return next(store.glob(f"*/rank*/{h.hex()}.kv"), None)


def test_restart_serves_the_stored_prefix(model, tmp_path):
    prompt, args = _prompt(1), ("--model", model, "--sp", "2", "--kv-store-dir", str(tmp_path), *ARGS)
    with Server(*args) as s:
        cold, usage = _ask(s, prompt)
        assert (usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens_details.stored_tokens) == (0, 0)
        assert s.metric("seqpar:kv_store_written_bytes_total") > 0
    stored = (len(prompt) - 1) // BS * BS  # every full block but the one holding the last token
    with Server(*args) as s:
        warm, usage = _ask(s, prompt)
        assert warm == cold
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens_details.stored_tokens == stored
        assert usage.prompt_tokens_details.host_tokens == 0  # all from disk: no host memory tier here
        assert s.metric("seqpar:kv_store_hits_total") == stored
        assert s.metric("seqpar:kv_store_misses_total") == 0
        assert s.metric("seqpar:kv_store_read_bytes_total") > 0 and s.metric("seqpar:kv_store_load_seconds_total") > 0
        # a second ask finds the blocks in the paged cache: cached, not loaded again
        again, usage = _ask(s, prompt)
        assert again == cold and usage.prompt_tokens_details.stored_tokens == 0
        assert usage.prompt_tokens_details.cached_tokens == stored
        assert s.metric("seqpar:kv_store_hits_total") == stored


def test_sigkill_while_writing_never_serves_a_wrong_token(model, tmp_path):
    first, second = _prompt(2), _prompt(3)
    args = ("--model", model, "--sp", "1", "--kv-store-dir", str(tmp_path), *ARGS)
    s = Server(*args)
    try:
        cold_first, _ = _ask(s, first)
        wait_until(lambda: _block_file(tmp_path, first, 0), 30, what="the first prompt's first block on disk")
        cold_second, _ = _ask(s, second)
        ranks = s.rank_pids()
        for pid in ranks:  # the writers first, at once: the second prompt's blocks are being written
            os.kill(pid, signal.SIGKILL)
        s.proc.send_signal(signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in ranks), 10, what="the ranks gone")
    finally:
        s.stop()
    # A write torn by a power cut would leave a short file under the final name: the first block's.
    torn = _block_file(tmp_path, first, 0)
    whole = torn.stat().st_size
    torn.write_bytes(torn.read_bytes()[: whole // 2])
    stale = torn.with_name(f"{'0' * 32}.tmp{ranks[0]}")  # a dead writer's temporary
    stale.write_bytes(b"partial")
    with Server(*args) as s:
        assert not stale.exists()  # swept when the rank opened its folder
        again_first, usage = _ask(s, first)
        assert again_first == cold_first
        assert usage.prompt_tokens_details.stored_tokens == 0  # its first block failed: all recomputed
        assert s.metric("seqpar:kv_store_misses_total") == 1
        again_second, usage = _ask(s, second)
        assert again_second == cold_second  # however much of it reached the disk
        assert s.metric("seqpar:kv_store_hits_total") == usage.prompt_tokens_details.stored_tokens
        # the torn file was deleted, its block recomputed and written whole again
        wait_until(lambda: torn.exists() and torn.stat().st_size == whole, 30, what="the block rewritten")
