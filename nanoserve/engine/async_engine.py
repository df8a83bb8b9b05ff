"""Online serving on top of the synchronous :class:`LLMEngine`: requests join the running batch as they arrive.

One engine thread owns the ``LLMEngine``; nothing else touches it. The event loop hands it requests and aborts
through a thread-safe command queue, applied between steps; the thread steps while any request is unfinished
and sleeps on the queue otherwise. Outputs go back to each request's :class:`RequestStream` with one
``loop.call_soon_threadsafe`` per step::

    event loop (HTTP handlers)                 engine thread
    ──────────────────────────                 ─────────────
    add_request ──► commands ─────────────────► engine.add_request ─┐
    abort ────────► commands ─────────────────► engine.abort_request │  between steps
                                                engine.step() ◄──────┘
    RequestStream ◄── call_soon_threadsafe ──── outputs of the step

A stream buffers what its consumer has not read yet: cumulative outputs replace each other (the newest holds
everything), delta outputs (``RequestOutputKind.DELTA``, what the server streams) are merged, so a slow
consumer gets one larger delta and loses nothing. If the engine thread fails, every in-flight request
fails with :class:`EngineDeadError` and :attr:`AsyncLLMEngine.is_healthy` turns false. A tensor-parallel worker
that dies is noticed by the step that needs it (its collective fails) or, while the engine is idle, by the
thread's own health check every ``HEALTH_CHECK_INTERVAL_S``, so ``/health`` turns 503 without waiting for traffic.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nanoserve.engine.llm_engine import LLMEngine, Prompt
from nanoserve.outputs import RequestOutput
from nanoserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (it failed, or the engine was shut down); no request can be served."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queued_requests`` allows; the client should retry later."""


class ExecutorUnhealthy(RuntimeError):
    """The executor reported a problem (a tensor-parallel worker died) while the engine was idle."""


# How often an idle engine thread asks the executor whether its workers are alive.
HEALTH_CHECK_INTERVAL_S = 0.5


@dataclass(frozen=True)
class EngineLimits:
    """Constants of the engine the HTTP layer checks requests against, read once at start-up."""

    max_model_len: int
    kv_capacity_tokens: int  # tokens the whole KV cache holds: a single sequence can never grow past this
    vocab_size: int


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after its latest step (or command), published by the engine thread."""

    num_running_requests: int = 0
    num_waiting_requests: int = 0
    num_running_seqs: int = 0
    num_waiting_seqs: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks held by sequences
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    max_seqs_in_step: int = 0  # the largest batch so far: > 1 means requests were batched together
    num_preemptions: int = 0
    num_aborted_requests: int = 0
    num_finished_requests: int = 0


class EngineObserver(Protocol):
    """Receives measurements from the engine thread (implementations must be thread-safe)."""

    def on_step(self, num_seqs: int, snapshot: EngineSnapshot) -> None: ...

    def on_first_token(self, seconds_since_arrival: float) -> None: ...

    def on_token_interval(self, seconds: float) -> None: ...

    def on_request_finished(self, reason: str, e2e_seconds: float) -> None: ...


class RequestStream:
    """Outputs of one request: the engine thread posts (via the loop), one consumer on the loop reads.

    Holds the output not yet read: the newest one, or with ``merge_deltas`` all unread deltas merged into one;
    a final output or an error ends the stream. Lives entirely on its event loop's thread.
    """

    def __init__(
        self, request_id: str, loop: asyncio.AbstractEventLoop, on_end: Callable[[RequestStream, bool], None],
        merge_deltas: bool = False,
    ) -> None:  # fmt: skip
        self.request_id = request_id
        self.loop = loop
        self.merge_deltas = merge_deltas
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.finished = False  # the final output (or an error) was handed to the consumer
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._on_end = on_end  # called once: (stream, whether the engine must abort the request)
        self._ended = False

    def close(self) -> None:
        """The consumer is done: if the request is still running, abort it (its blocks are freed at once)."""
        self._end(abort=True)

    def _end(self, abort: bool) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(self, abort)

    # -- called on the loop (via call_soon_threadsafe from the engine thread) --------------------------
    def _accept(self, error: BaseException | None) -> None:
        if error is not None:
            self._fail(error)
        elif not self.accepted.done():
            self.accepted.set_result(None)

    def _put(self, output: RequestOutput) -> None:
        if self._error is None and not (self._latest is not None and self._latest.finished):
            if self.merge_deltas and self._latest is not None:
                self._latest.add(output)
            else:
                self._latest = output
            self._ready.set()
            if output.finished:
                self._end(abort=False)

    def _fail(self, error: BaseException) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # mark retrieved: the consumer may be gone already
        if self._error is None:
            self._error = error
            self._ready.set()
        self._end(abort=False)

    # -- the consumer ----------------------------------------------------------------------------------
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await self._ready.wait()
        if self._latest is not None:
            output, self._latest = self._latest, None
            if self._error is None:
                self._ready.clear()
            if output.finished:
                self.finished = True
            return output
        self.finished = True
        assert self._error is not None
        raise self._error


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request (never read by the loop)."""

    stream: RequestStream
    arrival: float
    last_token_time: float | None = None


@dataclass(frozen=True)
class _Add:
    stream: RequestStream
    prompt: Prompt
    params: SamplingParams
    arrival: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


_STOP = object()


class AsyncLLMEngine:
    """Serve many concurrent requests from one :class:`LLMEngine` driven by a background thread.

    Contract: :meth:`start` before use, :meth:`shutdown` at the end; every other method is called from one
    asyncio event loop. ``max_queued_requests`` bounds the requests accepted but not yet running (``None``:
    no bound); beyond it :meth:`add_request` raises :class:`QueueFullError`.
    """

    def __init__(
        self,
        engine: LLMEngine,
        max_queued_requests: int | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        if max_queued_requests is not None and max_queued_requests < 0:
            raise ValueError(f"max_queued_requests: must be >= 0, got {max_queued_requests}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.observer = observer
        self.limits = EngineLimits(
            max_model_len=engine.max_model_len,
            kv_capacity_tokens=engine.block_manager.num_blocks * engine.block_manager.block_size,
            vocab_size=engine.vocab_size,
        )
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # why the engine thread stopped; set once
        self._stopping = False
        self._engine_shut_down = False
        # Guards the hand-over of commands against the thread's final drain, so no add is left unanswered.
        self._lock = threading.Lock()
        self._closed = False
        # Loop-side: streams not yet closed by their consumer (running or waiting).
        self._num_in_flight = 0
        # Engine-thread side.
        self._tracked: dict[str, _Tracked] = {}
        self._num_aborted = 0
        self._num_finished = 0
        self.snapshot = self._take_snapshot()

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncLLMEngine.start() called twice")
        self._thread = threading.Thread(target=self._run, name="nanoserve-engine", daemon=True)
        self._thread.start()
        # The grammar library's view of the tokenizer (about a second for a 150k vocabulary), built now so the
        # first constrained request does not wait for it; a tokenizer it cannot read errors on that request.
        threading.Thread(target=self._prepare_grammars, name="nanoserve-grammars", daemon=True).start()

    def _prepare_grammars(self) -> None:
        try:
            self.engine.grammars.prepare()
        except ValueError as exc:
            logger.info("%s", exc)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread (failing any request still in flight) and release the executor's workers.
        Idempotent."""
        self._stopping = True
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %.0f s", timeout)
                return
        if not self._engine_shut_down:
            self._engine_shut_down = True
            self.engine.shutdown()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None and not self._stopping

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    # ---- requests (event loop) -----------------------------------------------------------------------
    async def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None
    ) -> RequestStream:
        """Queue a request and wait until the engine thread accepted it (one step at most).

        Raises ``ValueError`` if the engine rejects it (it never ran), :class:`QueueFullError` if too many
        requests wait, :class:`EngineDeadError` if the engine is not running. The caller must consume the
        stream or close it; :meth:`generate` does both.
        """
        (stream,) = await self.add_requests([(request_id, prompt, params)], arrival_time)
        return stream

    async def add_requests(
        self, requests: list[tuple[str, Prompt, SamplingParams]], arrival_time: float | None = None
    ) -> list[RequestStream]:
        """Queue several requests so that they join the same step, all or none: if the engine rejects one,
        the others are aborted and its error is raised. Errors as in :meth:`add_request`."""
        self._check_alive()
        if self.max_queued_requests is not None:
            num_waiting = self._num_in_flight - self.snapshot.num_running_requests
            if num_waiting + len(requests) > self.max_queued_requests:
                raise QueueFullError(
                    f"{num_waiting} requests are already waiting (max_queued_requests={self.max_queued_requests}); "
                    "retry later"
                )
        loop = asyncio.get_running_loop()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        adds = [
            _Add(RequestStream(rid, loop, self._on_stream_end, params.output_kind is RequestOutputKind.DELTA),
                 prompt, params, arrival)
            for rid, prompt, params in requests
        ]  # fmt: skip
        self._num_in_flight += len(adds)
        try:
            with self._lock:
                if self._closed:  # the thread stopped after our check: nobody would answer the command
                    for add in adds:
                        add.stream._fail(self._dead_error())
                else:
                    self._commands.put(adds)
            for add in adds:
                await add.stream.accepted
        except BaseException:
            for add in adds:
                add.stream.close()  # aborts the accepted ones; a no-op for the rejected
            raise
        return [add.stream for add in adds]

    async def compile_grammar(self, spec: StructuredOutputsParams) -> None:
        """Compile (and cache) a constrained request's grammar in a worker thread, off the engine's step loop;
        ValueError naming the field if it is invalid."""
        await asyncio.to_thread(self.engine.grammars.compile, spec)

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort a request and free its blocks at once (no-op if it already ended)."""
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_Abort(request_id))

    def _on_stream_end(self, stream: RequestStream, abort: bool) -> None:
        self._num_in_flight -= 1
        if abort:
            self.abort(stream.request_id)

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str, arrival_time: float | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request (by its ``output_kind``); the last has ``finished=True``. If the consumer stops early
        (closes the generator, is cancelled, raises), the request is aborted."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def _check_alive(self) -> None:
        if self._error is not None or self._stopping or self._thread is None or not self._thread.is_alive():
            raise self._dead_error()

    def _dead_error(self) -> EngineDeadError:
        if self._error is not None:
            return EngineDeadError(f"the engine failed: {type(self._error).__name__}: {self._error}")
        if self._thread is None:
            return EngineDeadError("the engine is not started")
        return EngineDeadError("the engine is shutting down")

    # ---- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    break
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._observe_tokens(self.engine.stats.last_step_request_ids)
                    self._deliver(outputs)
                    self.snapshot = self._take_snapshot()
                    if self.observer is not None:
                        self.observer.on_step(self.engine.stats.last_step_running, self.snapshot)
                else:
                    self._check_executor()
                    self.snapshot = self._take_snapshot()
        except BaseException as exc:  # noqa: BLE001 - any failure ends serving; report it to every request
            logger.exception("engine thread failed; failing all in-flight requests")
            self._error = exc
        self._fail_everything(self._dead_error())

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; False when asked to stop. When idle, waits for the first one (at most
        ``HEALTH_CHECK_INTERVAL_S``, so the idle thread keeps checking its executor)."""
        applied_any = False
        while True:
            wait = block and not applied_any
            try:
                cmd = self._commands.get(block=wait, timeout=HEALTH_CHECK_INTERVAL_S if wait else None)
            except queue.Empty:
                return True
            applied_any = True
            if cmd is _STOP:
                return False
            if isinstance(cmd, list):  # of _Add, applied together so they share the next step
                for add in cmd:
                    self._apply_add(add)
            else:
                self._apply_abort(cmd.request_id)

    def _check_executor(self) -> None:
        """Raise if the executor knows it cannot run another step (a worker process is gone)."""
        check = getattr(self.engine.executor, "check_health", None)
        problem = check() if check is not None else None
        if problem is not None:
            raise ExecutorUnhealthy(problem)

    def _apply_add(self, cmd: _Add) -> None:
        stream = cmd.stream
        try:
            self.engine.add_request(stream.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival)
        except ValueError as exc:
            stream.loop.call_soon_threadsafe(stream._accept, exc)
            return
        self._tracked[stream.request_id] = _Tracked(stream, cmd.arrival)
        stream.loop.call_soon_threadsafe(stream._accept, None)

    def _apply_abort(self, request_id: str) -> None:
        output = self.engine.abort_request(request_id)
        if output is not None:
            self._num_aborted += 1
            self._deliver([output])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up of each event loop per step."""
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            self._observe(tracked, output, now)
            if output.finished:
                del self._tracked[output.request_id]
                self._num_finished += 1
            by_loop.setdefault(tracked.stream.loop, []).append((tracked.stream, output))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_post_outputs, batch)
            except RuntimeError:  # that loop is closed: its consumers are gone
                pass

    def _observe_tokens(self, request_ids: list[str]) -> None:
        """Token timing of the requests that received tokens in the last step, whatever outputs they asked
        for (a non-streamed request gets no output until it ends, but its tokens still arrive one a step)."""
        if self.observer is None:
            return
        now = time.monotonic()
        for request_id in request_ids:
            tracked = self._tracked.get(request_id)
            if tracked is None:
                continue
            if tracked.last_token_time is None:
                self.observer.on_first_token(now - tracked.arrival)
            else:
                self.observer.on_token_interval(now - tracked.last_token_time)
            tracked.last_token_time = now

    def _observe(self, tracked: _Tracked, output: RequestOutput, now: float) -> None:
        if self.observer is not None and output.finished:
            reasons = {c.finish_reason for c in output.outputs}
            reason = "abort" if "abort" in reasons else ("length" if "length" in reasons else "stop")
            self.observer.on_request_finished(reason, now - tracked.arrival)

    def _fail_everything(self, error: EngineDeadError) -> None:
        """After the thread stopped: fail every tracked request and every command nobody will apply."""
        streams = [t.stream for t in self._tracked.values()]
        self._tracked.clear()
        with self._lock:
            self._closed = True
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, list):
                    streams.extend(add.stream for add in cmd)
        for stream in streams:
            try:
                stream.loop.call_soon_threadsafe(stream._fail, error)
            except RuntimeError:
                pass

    def _take_snapshot(self) -> EngineSnapshot:
        sched = self.engine.scheduler
        bm = self.engine.block_manager
        stats = self.engine.stats
        running_ids = {s.request_id for s in sched.running}
        return EngineSnapshot(
            num_running_requests=len(running_ids),
            num_waiting_requests=len(self.engine.requests) - len(running_ids),
            num_running_seqs=len(sched.running),
            num_waiting_seqs=len(sched.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits,
            prompt_tokens=stats.prompt_tokens,
            generation_tokens=stats.generation_tokens,
            num_steps=stats.num_steps,
            max_seqs_in_step=stats.max_running_in_step,
            num_preemptions=sched.num_preemptions,
            num_aborted_requests=self._num_aborted,
            num_finished_requests=self._num_finished,
        )


def _post_outputs(batch: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in batch:
        stream._put(output)
