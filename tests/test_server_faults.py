"""The API key, a rank killed mid-request, and a clean shutdown: one server for the module.

A killed rank must fail every request in flight within 30 s (a stream gets an error event,
a waiting call a 503), /health must say 503 while the engine rebuilds itself, and then the
same HTTP process serves again. SIGTERM stops the ranks and leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from server_util import Server, alive, save_tiny_chat_model, wait_until

pytestmark = pytest.mark.timeout(180)
KEY = "sk-test-0123456789"
# Two of these fit the cache even with whole-life reservations; each runs for ~10 s.
LONG = dict(model="tiny", max_tokens=1500, temperature=0, extra_body={"ignore_eos": True})


def exchange_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("seqpar-*")} if Path("/dev/shm").is_dir() else set()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny_chat_model(tmp_path_factory.mktemp("tiny"), context=4096)
    with Server(
        "--model",
        model,
        "--sp",
        "2",
        "--kv-cache-gb",
        "0.0005",
        "--served-model-name",
        "tiny",
        env={"SEQPAR_API_KEY": KEY},
    ) as s:
        yield s


def client(server: Server, key: str = KEY, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, timeout=timeout, max_retries=0)


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/v1/models", "/tokenize"):
            if path == "/tokenize":
                r = server.post(path, json={"prompt": "w5"}, headers=headers)
            else:
                r = server.get(path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == 401 and "Bearer" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    for path in ("/health", "/metrics", "/version"):
        assert server.get(path).status_code == 200, path


def test_killed_rank_fails_requests_then_the_engine_restarts(server):
    c = client(server)
    ranks = server.rank_pids()
    assert len(ranks) == 2
    stream = c.completions.create(prompt="w5 w6", stream=True, **LONG)
    assert next(iter(stream)).choices  # generating
    waiting: dict[str, object] = {}

    def non_streaming() -> None:
        try:
            waiting["result"] = client(server, timeout=120).completions.create(prompt="w7", **LONG)
        except openai.APIStatusError as e:
            waiting["error"] = e

    t = threading.Thread(target=non_streaming)
    t.start()
    wait_until(lambda: server.metric("seqpar:num_requests_running") == 2, 20, 0.02, "both requests running")
    os.kill(ranks[-1], signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(openai.APIError, match="engine failed"):
        for _ in stream:
            pass
    t.join(30)
    assert time.monotonic() - killed < 30 and not t.is_alive()
    assert isinstance(waiting.get("error"), openai.APIStatusError) and waiting["error"].status_code == 503
    health = server.get("/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == 503
    wait_until(lambda: server.get("/health").status_code == 200, 90, 0.2, "engine restarted")
    out = c.completions.create(model="tiny", prompt="w5 w6", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1
    assert server.metric("seqpar:engine_restarts_total") == 1
    assert not set(server.rank_pids()) & set(ranks)


def test_sigterm_stops_ranks_and_leaves_nothing(server):
    ranks = server.rank_pids()
    assert ranks and all(alive(p) for p in ranks)
    stream = client(server).completions.create(prompt="w8", stream=True, **LONG)
    assert next(iter(stream)).choices
    before = exchange_files()
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises((openai.APIError, httpx.HTTPError)):  # the open stream ends, with an error event
        for _ in stream:
            pass
    server.proc.wait(30)
    wait_until(lambda: not any(alive(p) for p in ranks), 10, 0.1, "rank processes gone")
    assert not (exchange_files() - before)
