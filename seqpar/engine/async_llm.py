"""The online engine: requests arrive and leave while one thread steps an `LLMEngine`.

Threads. The engine thread owns the `LLMEngine` (and through it the rank processes);
nothing else touches it. Callers, on an asyncio loop, hand it commands (add, abort)
through a FIFO under a condition variable; it answers each request through that
request's own `asyncio.Queue`, filled with `loop.call_soon_threadsafe`. Because the
FIFO keeps order, an abort always finds its request already added (or finished).

Each loop turn: apply every queued command, refresh the stats snapshot, then run one
`step()` if anything is unfinished (else sleep until a command comes). A request
added mid-batch is therefore scheduled at the next step, and an aborted one leaves
the batch before it, its KV blocks freed by `LLMEngine.abort` at once.

Faults. Any exception out of a step (`EngineDeadError` when a rank dies) fails every
in-flight and queued request with `EngineDownError`, marks the engine unhealthy, shuts
the old engine down and builds a new one (with back-off if that fails too); then it
serves again. The process that owns the `AsyncLLM` never restarts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from seqpar.engine.llm_engine import LLMEngine
from seqpar.engine.outputs import EngineStats, LogprobDict, RequestOutput
from seqpar.engine.sampling_params import SamplingParams

_IDLE_WAIT_S = 0.5
_MAX_BACKOFF_S = 30.0


class EngineDownError(RuntimeError):
    """The engine is dead, restarting or shut down: the request was not (or not fully) served."""


@dataclass
class RequestUpdate:
    """What one step produced for one request."""

    text: str  # new text since the last update (a possible stop-string prefix is held back)
    token_ids: list[int]  # new token ids
    logprobs: list[LogprobDict] | None  # one entry per new token, when logprobs were asked for
    output: RequestOutput  # the whole request so far; final when `finished`
    finished: bool
    time: float  # monotonic, when the step ended
    arrival: float  # monotonic, when add_request was called
    queue_time: float | None = None  # first update only: arrival -> start of the step that produced it


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    rid: int | None = None  # the engine's id, set by the engine thread
    num_tokens: int = 0  # output tokens already sent
    done: bool = False  # set on the loop side once the last item was taken

    def push(self, item: RequestUpdate | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


@dataclass
class _Add:
    prompt: str | list[int]
    params: SamplingParams
    stream: _Stream
    accepted: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Abort:
    stream: _Stream


class RequestStream:
    """One request's outputs: `async for update in stream`; `abort()` (or leaving
    `async with stream`) drops an unfinished request and frees its KV blocks."""

    def __init__(self, owner: AsyncLLM, stream: _Stream):
        self._owner, self._stream = owner, stream

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestUpdate:
        if self._stream.done:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            self._stream.done = True
            raise item
        self._stream.done = item.finished
        return item

    def abort(self) -> None:
        if not self._stream.done:
            self._stream.done = True
            self._owner._post(_Abort(self._stream))

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.abort()


class AsyncLLM:
    """`LLMEngine` as a service: `await add_request(...)` at any moment, stream the outputs.

    `engine_factory` builds an engine (called again after every failure); `restart=False`
    leaves a failed engine dead (under torchrun the other ranks cannot be rebuilt from
    here) and calls `on_dead`.
    """

    def __init__(
        self, engine_factory: Callable[[], LLMEngine], restart: bool = True, on_dead: Callable[[], None] | None = None
    ):
        self._factory, self._restart, self._on_dead = engine_factory, restart, on_dead
        self._cond = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()
        self._streams: dict[int, _Stream] = {}  # engine thread only
        self._stopping = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._base = EngineStats(
            num_running=0, num_waiting=0, kv_cache_usage=[]
        )  # cumulative counters of engines that died
        self._stats = self._base
        self.healthy = False
        self.status = "starting"
        self.num_restarts = 0
        self.last_error: str | None = None
        self.model_config: Any = None
        self.max_model_len = 0
        self._thread = threading.Thread(target=self._run, name="seqpar-engine", daemon=True)

    # ---- caller side (any thread; coroutines on the caller's loop) -------------------
    def start(self) -> AsyncLLM:
        """Build the first engine; raises what building it raised (a bad model is no restart case)."""
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self

    async def add_request(self, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; raises ValueError (bad prompt) or EngineDownError once the engine answers."""
        if not self.healthy:
            hint = "; try again shortly" if self.status in ("starting", "restarting") else ""
            raise EngineDownError(f"the engine is {self.status}{hint}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        cmd = _Add(prompt, params, stream)
        self._post(cmd)
        try:
            await asyncio.wrap_future(cmd.accepted)
        except asyncio.CancelledError:
            self._post(_Abort(stream))  # after the add in the FIFO: drops it if it got in
            raise
        return RequestStream(self, stream)

    def stats(self) -> EngineStats:
        """The latest snapshot; counters are cumulative over every engine this AsyncLLM built."""
        return self._stats

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the engine; requests in flight end with EngineDownError. If the engine thread is
        stuck in a step (a rank wedged), their streams are failed from here after `timeout`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            self.healthy, self.status = False, "stopped"
            error = EngineDownError("the server is shutting down (the engine did not stop in time)")
            for st in list(self._streams.values()):  # the engine thread is blocked: nothing else touches these
                st.push(error)

    def _post(self, cmd: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    # ---- engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        backoff = 1.0
        first = True
        while not self._stopping:
            try:
                engine = self._factory()
            except BaseException as e:  # noqa: BLE001 - reported to start() or retried
                if first:
                    self._start_error = e
                    self._ready.set()
                    return
                self.last_error = f"restart failed: {type(e).__name__}: {e}"
                self._sleep(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
                continue
            if not first:
                self.num_restarts += 1
            self.model_config, self.max_model_len = engine.model_config, engine.max_model_len
            self.healthy, self.status, backoff = True, "running", 1.0
            self._ready.set()
            first = False
            try:
                self._serve(engine)
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self._fail(
                    engine,
                    EngineDownError(
                        f"the engine failed while serving this request ({type(e).__name__}: {first_line}); "
                        + ("it is restarting, send the request again" if self._restart else "it cannot restart")
                    ),
                )
                traceback.print_exc()
                if not self._restart:
                    if self._on_dead is not None:
                        self._on_dead()
                    return
                continue
            self._fail(engine, EngineDownError("the server is shutting down"))
            return

    def _serve(self, engine: LLMEngine) -> None:
        while True:
            with self._cond:
                if not self._commands and not self._stopping and not engine.has_unfinished():
                    self._cond.wait(_IDLE_WAIT_S)
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for cmd in commands:
                self._apply(engine, cmd)
            if commands:
                self._snapshot(engine)
            if engine.has_unfinished():
                start = time.monotonic()
                stepped = engine.step()
                self._snapshot(engine)  # first: a client that sees its last token sees the stats after it
                self._publish(engine, stepped, start)
                if not stepped:  # nothing could be scheduled: do not spin
                    with self._cond:
                        if not self._commands:
                            self._cond.wait(0.01)

    def _apply(self, engine: Any, cmd: _Add | _Abort) -> None:
        st = cmd.stream
        if isinstance(cmd, _Abort):
            if st.rid is not None and st.rid in self._streams:
                del self._streams[st.rid]
                engine.abort([st.rid])
                engine.forget(st.rid)
            return
        if not cmd.accepted.set_running_or_notify_cancel():
            return  # the caller gave up waiting (client gone): never add it
        try:
            st.rid = engine.add_request(cmd.prompt, cmd.params)
        except ValueError as e:  # the client's prompt: a 400, never an engine failure
            cmd.accepted.set_exception(e)
            return
        self._streams[st.rid] = st
        cmd.accepted.set_result(st.rid)

    def _publish(self, engine: Any, stepped: list[int], start: float) -> None:
        now = time.monotonic()
        for rid in stepped:
            st = self._streams.get(rid)
            if st is None:
                continue
            out = engine.output(rid)
            comp = out.outputs[0]
            new_ids = comp.token_ids[st.num_tokens :]
            new_lps = comp.logprobs[st.num_tokens :] if comp.logprobs is not None else None
            first = st.num_tokens == 0
            st.num_tokens = len(comp.token_ids)
            if first:
                queue_time = out.metrics.get("queue_time_s", start - st.arrival)
            st.push(
                RequestUpdate(
                    engine.pop_delta(rid),
                    new_ids,
                    new_lps,
                    out,
                    out.finished,
                    now,
                    st.arrival,
                    queue_time if first else None,
                )
            )
            if out.finished:
                del self._streams[rid]
                engine.forget(rid)

    def _snapshot(self, engine: LLMEngine) -> None:
        s, b = engine.stats(), self._base
        self._stats = replace(
            s,
            num_preemptions=b.num_preemptions + s.num_preemptions,
            prefix_cache_queries=b.prefix_cache_queries + s.prefix_cache_queries,
            prefix_cache_hits=b.prefix_cache_hits + s.prefix_cache_hits,
            kv_store_hits=b.kv_store_hits + s.kv_store_hits,
            kv_store_misses=b.kv_store_misses + s.kv_store_misses,
            kv_store_bytes_read=b.kv_store_bytes_read + s.kv_store_bytes_read,
            kv_store_bytes_written=b.kv_store_bytes_written + s.kv_store_bytes_written,
            kv_store_load_seconds=b.kv_store_load_seconds + s.kv_store_load_seconds,
            kv_store_host_hits=b.kv_store_host_hits + s.kv_store_host_hits,
            kv_store_host_bytes_written=b.kv_store_host_bytes_written + s.kv_store_host_bytes_written,
            sp_bytes_sent=_add(b.sp_bytes_sent, s.sp_bytes_sent),
        )

    def _fail(self, engine: Any, error: EngineDownError) -> None:
        """Fail every request in flight or queued, keep the counters, stop the engine."""
        self.healthy = False
        self.status = "stopped" if self._stopping else "restarting" if self._restart else "dead"
        s = self._stats
        self._base = self._stats = replace(
            s,
            num_running=0,
            num_waiting=0,
            kv_cache_usage=[0.0] * len(s.kv_cache_usage),
            sp_bytes_sent=list(s.sp_bytes_sent),
        )
        for st in self._streams.values():
            st.push(error)
        self._streams.clear()
        with self._cond:
            commands = list(self._commands)
            self._commands.clear()
        for cmd in commands:
            if isinstance(cmd, _Add) and cmd.accepted.set_running_or_notify_cancel():
                cmd.accepted.set_exception(error)
        try:
            engine.shutdown()
        except Exception:  # a dead engine may fail to stop cleanly; its ranks are gone either way
            traceback.print_exc()

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            if not self._stopping:
                self._cond.wait(seconds)


def _add(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
