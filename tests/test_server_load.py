"""Under load: many long requests at once on a small KV cache, and clients that hang up.

The model's context is 4096 tokens and each SP rank caches ~2K tokens, so eight requests
that may each run to the full context could never all hold full reservations: they run at
once only if KV blocks are given as tokens are made. A request that would take ~4000
decode steps and is dropped by its client must leave the batch, and give its blocks back,
within seconds.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from server_util import Server, save_tiny_chat_model, wait_until

pytestmark = pytest.mark.timeout(180)
CONTEXT = 4096
LONG = dict(model="tiny", max_tokens=3000, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny_chat_model(tmp_path_factory.mktemp("tiny"), context=CONTEXT)
    # 0.0005 GiB per rank: 2K tokens of this model (2 layers x 2 KV heads x 8 dims x fp32 x K,V = 256 B a token).
    with Server("--model", model, "--sp", "2", "--kv-cache-gb", "0.0005", "--served-model-name", "tiny") as s:
        yield s


def idle(server: Server) -> bool:
    m = server.metrics()
    usage = [v for (name, labels), v in m.items() if name == "seqpar:kv_cache_usage_perc"]
    idle = m[("seqpar:num_requests_running", ())] == 0 and m[("seqpar:num_requests_waiting", ())] == 0
    return idle and not any(usage)


async def consume(stream) -> int:
    n = 0
    async for _ in stream:
        n += 1
    return n


def test_eight_long_streams_run_at_once_then_all_disconnect(server):
    async def run() -> float:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
        streams = [
            await client.completions.create(prompt=f"w{10 + i} w{20 + i}", stream=True, **LONG) for i in range(8)
        ]
        readers = [asyncio.ensure_future(consume(s)) for s in streams]
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: server.metric("seqpar:num_requests_running") == 8,
                30,
                0.02,
                "8 requests running at once",
            )
            assert not any(r.done() for r in readers)
        finally:
            for r in readers:
                r.cancel()
            for s in streams:
                await s.close()  # the clients hang up
        start = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: idle(server), 10, 0.05, "running 0 and KV usage 0")
        await client.close()
        return time.monotonic() - start

    assert asyncio.run(run()) < 10


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": "w7"}], stream=True, **LONG)
        got = 0
        async for _ in stream:
            got += 1
            if got == 5:
                break
        assert server.metric("seqpar:num_requests_running") == 1
        await stream.close()
        await asyncio.to_thread(wait_until, lambda: idle(server), 5, 0.05, "running 0 and KV usage 0")
        # the engine stopped: no more bytes move between the ranks
        sent = [v for (n, _), v in server.metrics().items() if n == "seqpar:sp_bytes_sent_total"]
        await asyncio.sleep(0.5)
        assert [v for (n, _), v in server.metrics().items() if n == "seqpar:sp_bytes_sent_total"] == sent
        await client.close()

    asyncio.run(run())


def test_non_streaming_client_that_gives_up_aborts_its_request(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**LONG, "prompt": "w9", **LONG["extra_body"]}, timeout=1.5)
    wait_until(lambda: idle(server), 5, 0.05, "running 0 and KV usage 0 after the client left")
    assert server.metric("seqpar:request_success_total", finished_reason="abort") >= 1
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": "w9", "max_tokens": 3})
    assert r.status_code == 200
