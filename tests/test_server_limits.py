"""A hostile client against `seqpar serve`: huge texts are refused by their length before they are
tokenized, while /health keeps answering; refused bodies leave the process no larger; bodies over
the limit get 413; and OpenAI's defaults where a field is null. One server (tiny random model with
a byte-level tokenizer, so a text's length bounds its tokens) for the module.

The time bounds (1 s) are functional, not benchmarks: before this, the 20 MB prompt held the
server for ~18 s.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from server_util import Server, save_tiny_bytelevel_model

pytestmark = pytest.mark.timeout(180)
MAX_MODEL_LEN = 64
BODY_MB = 40
HUGE = "hello world " * (20 * 2**20 // 12)  # 20 MB
# Encoded once: the time bound is on the server, not on the client's JSON encoding of 20 MB.
HUGE_BODIES = {
    "completions": ("/v1/completions", json.dumps({"prompt": HUGE}).encode()),
    "chat": ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": HUGE}]}).encode()),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny_bytelevel_model(tmp_path_factory.mktemp("tiny"), MAX_MODEL_LEN)
    args = ("--sp", "2", "--kv-cache-gb", "0.01", "--max-model-len", str(MAX_MODEL_LEN))
    with Server("--model", model, *args, "--max-request-body-mb", str(BODY_MB), "--served-model-name", "tiny") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def refuse_huge(client: openai.OpenAI, chat: bool) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as err:
        if chat:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": HUGE}])
        else:
            client.completions.create(model="tiny", prompt=HUGE)
    return err.value


@pytest.mark.parametrize("route", list(HUGE_BODIES))
def test_huge_prompt_is_refused_fast_while_health_answers(server, route):
    health: list[float] = []
    done = threading.Event()

    def poll() -> None:  # at least once, however fast the refusal
        while True:
            t = time.monotonic()
            assert server.get("/health", timeout=5).status_code == 200
            health.append(time.monotonic() - t)
            if done.wait(0.01):
                return

    path, body = HUGE_BODIES[route]
    poller = threading.Thread(target=poll)
    poller.start()
    t = time.monotonic()
    try:
        r = server.post(path, content=body, headers={"content-type": "application/json"})
    finally:
        took = time.monotonic() - t
        done.set()
        poller.join()
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == ("messages" if route == "chat" else "prompt"), r.text
    assert "characters" in err["message"] and str(MAX_MODEL_LEN) in err["message"], err
    assert took < 1.0, f"the refusal took {took:.2f}s"
    assert max(health) < 1.0, f"/health took up to {max(health):.2f}s during it"


def test_refused_huge_requests_leave_the_process_no_larger(server, client):
    before = rss_mib(server.proc.pid)
    for i in range(10):
        refuse_huge(client, chat=bool(i % 2))
    time.sleep(0.5)  # the memory is handed back after the response is sent
    after = rss_mib(server.proc.pid)
    assert after - before < 50, f"RSS {before:.0f} MiB -> {after:.0f} MiB"


def test_body_over_the_limit_is_413_with_or_without_content_length(server):
    json_type = {"content-type": "application/json"}
    big = b" " * (BODY_MB * 2**20 + 1)
    r = server.post("/v1/completions", content=big, headers=json_type)
    assert r.status_code == 413 and f"{BODY_MB} MiB" in r.json()["error"]["message"], r.text

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(BODY_MB + 1):
            yield b" " * 2**20

    r = server.post("/v1/completions", content=chunked(), headers=json_type)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413, r.text
    assert server.get("/health").status_code == 200


def test_long_stop_string_and_too_many_are_refused(client):
    for stop, param in (["x" * 10_000], "stop[0]"), (["x"] * 65, "stop"):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt="hi", stop=stop)
        assert err.value.body["param"] == param


def test_null_max_tokens_is_16_for_completions_and_the_context_for_chat(server):
    r = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": None, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
    r = server.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 16, r.text
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": None, "ignore_eos": True}
    r = server.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == MAX_MODEL_LEN and r.json()["choices"][0]["finish_reason"] == "length"


def test_temperature_2_is_taken_and_above_refused(client):
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=2.0)
    assert out.usage.completion_tokens >= 1
    for t in (2.01, 1e308):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=t)
        assert err.value.body["param"] == "temperature"


def test_http_client_without_json_type_gets_415(server):
    r = httpx.post(f"{server.url}/v1/completions", data={"prompt": "hi"}, timeout=30)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
