"""AsyncLLM's own rules, on a scripted stand-in for LLMEngine (the real engine is served in
the test_server_* modules): requests join between steps, an abort reaches the engine, a
failing step fails every request at once and the engine is rebuilt, counters survive it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from seqpar.engine.async_llm import AsyncLLM, EngineDownError
from seqpar.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from seqpar.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(60)


class FakeEngine:
    """Each step gives every unfinished request one token (its id); `fail_at` makes a step raise."""

    tokenizer, model_config, max_model_len = None, None, 100

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.steps, self.thread = fail_at, 0, None
        self.reqs: dict[int, dict] = {}
        self.aborted: list[int] = []
        self.shut = False

    def _check_thread(self) -> None:  # the engine is touched from one thread only
        self.thread = self.thread or threading.current_thread()
        assert threading.current_thread() is self.thread

    def add_request(self, prompt, params: SamplingParams) -> int:
        self._check_thread()
        if not prompt:
            raise ValueError("empty prompt")
        rid = len(self.reqs)
        self.reqs[rid] = {"prompt": list(prompt), "out": [], "max": params.max_tokens, "delta": "", "done": False}
        return rid

    def has_unfinished(self) -> bool:
        return any(not r["done"] for r in self.reqs.values())

    def step(self) -> list[int]:
        self._check_thread()
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("rank 1 died")
        live = [rid for rid, r in self.reqs.items() if not r["done"]]
        for rid in live:
            r = self.reqs[rid]
            r["out"].append(rid)
            r["delta"] += f"t{rid} "
            r["done"] = len(r["out"]) >= r["max"]
        return live

    def output(self, rid: int) -> RequestOutput:
        r = self.reqs[rid]
        comp = CompletionOutput(0, "", list(r["out"]), None, None, "length" if r["done"] else None)
        return RequestOutput(str(rid), None, r["prompt"], None, [comp], r["done"], {"step": self.steps})

    def pop_delta(self, rid: int) -> str:
        d, self.reqs[rid]["delta"] = self.reqs[rid]["delta"], ""
        return d

    def abort(self, rids: list[int]) -> None:
        self.aborted += rids
        for rid in rids:
            self.reqs[rid]["done"] = True

    def forget(self, rid: int) -> None:
        pass

    def stats(self) -> EngineStats:
        running = sum(not r["done"] for r in self.reqs.values())
        return EngineStats(running, 0, [running / 10], num_preemptions=self.steps, sp_bytes_sent=[self.steps])

    def shutdown(self) -> None:
        self.shut = True


def make(*engines: FakeEngine) -> AsyncLLM:
    it = iter(engines)
    return AsyncLLM(lambda: next(it)).start()


async def collect(llm: AsyncLLM, prompt, n: int) -> list:
    stream = await llm.add_request(prompt, SamplingParams(max_tokens=n))
    async with stream:
        return [u async for u in stream]


def test_requests_stream_their_own_tokens_and_a_bad_prompt_is_a_value_error():
    engine = FakeEngine()
    llm = make(engine)

    async def run() -> None:
        a, b = await asyncio.gather(collect(llm, [1], 3), collect(llm, [2, 3], 5))
        assert [u.token_ids for u in a] == [[0]] * 3 and "".join(u.text for u in a) == "t0 t0 t0 "
        assert len(b) == 5 and b[-1].finished and not b[0].finished and b[0].queue_time is not None
        with pytest.raises(ValueError, match="empty prompt"):
            await llm.add_request([], SamplingParams())

    asyncio.run(run())
    llm.shutdown()
    assert engine.shut and llm.status == "stopped"


def test_abort_reaches_the_engine():
    engine = FakeEngine()
    llm = make(engine)

    async def run() -> None:
        stream = await llm.add_request([1], SamplingParams(max_tokens=10**6))
        async with stream:
            await stream.__anext__()
        for _ in range(100):
            if engine.aborted:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert engine.aborted == [0]
    llm.shutdown()


def test_a_failing_step_fails_every_request_and_the_engine_is_rebuilt():
    first, second = FakeEngine(fail_at=3), FakeEngine()
    llm = make(first, second)

    async def run() -> None:
        results = await asyncio.gather(collect(llm, [1], 50), collect(llm, [2], 50), return_exceptions=True)
        assert all(isinstance(r, EngineDownError) and "rank 1 died" in str(r) for r in results)
        for _ in range(200):  # rebuilt in the background
            if llm.healthy:
                break
            await asyncio.sleep(0.01)
        assert llm.healthy and llm.num_restarts == 1 and first.shut
        assert len(await collect(llm, [3], 2)) == 2

    asyncio.run(run())
    # counters carry over the restart: the dead engine's last snapshot (after its 2nd step) plus the new one's
    assert llm.stats().num_preemptions == 2 + second.steps and llm.stats().sp_bytes_sent == [2 + second.steps]
    llm.shutdown()


def test_a_dead_engine_refuses_at_once_and_a_failed_first_build_raises():
    llm = AsyncLLM(lambda: FakeEngine(fail_at=1), restart=False, on_dead=lambda: None).start()

    async def run() -> None:
        with pytest.raises(EngineDownError):
            await collect(llm, [1], 5)
        with pytest.raises(EngineDownError, match="dead"):
            await llm.add_request([1], SamplingParams())

    asyncio.run(run())
    llm.shutdown()
    with pytest.raises(ValueError, match="no such model"):
        AsyncLLM(lambda: (_ for _ in ()).throw(ValueError("no such model"))).start()
