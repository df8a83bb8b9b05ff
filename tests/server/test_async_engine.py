"""AsyncLLMEngine on a real tiny engine, in-process: streaming, aborts that free blocks, failures that fail every
request instead of hanging, the queue bound, shutdown."""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nanoserve.config import EngineConfig
from nanoserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineSnapshot, QueueFullError
from nanoserve.engine.llm_engine import LLMEngine
from nanoserve.outputs import RequestOutput
from nanoserve.sampling_params import SamplingParams

OPTIONS = dict(max_model_len=256, kv_cache_memory="4MiB", max_num_seqs=64, seed=0)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
TIMEOUT = 30.0


@pytest.fixture
def make_engine(tiny_model: pathlib.Path) -> Iterator[Callable[..., AsyncLLMEngine]]:
    made: list[AsyncLLMEngine] = []

    def make(**kwargs: Any) -> AsyncLLMEngine:
        engine = AsyncLLMEngine(LLMEngine(EngineConfig.create(str(tiny_model), **OPTIONS)), **kwargs)
        engine.start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def all_free(s: EngineSnapshot) -> bool:
    return s.num_free_blocks == s.num_total_blocks and s.num_running_requests == 0 and s.num_waiting_requests == 0


def test_streams_cumulative_outputs_equal_to_the_sync_engine(make_engine, tiny_model) -> None:
    engine = make_engine()
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def one(i: int) -> list[RequestOutput]:
        return [out async for out in engine.generate({"prompt_token_ids": prompts[i]}, params, f"r{i}")]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(one(i) for i in range(3)))

    streams = run(main())
    sync = LLMEngine(EngineConfig.create(str(tiny_model), **OPTIONS))
    for i, p in enumerate(prompts):
        sync.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    want: dict[str, RequestOutput] = {}
    while sync.has_unfinished_requests():
        want.update({o.request_id: o for o in sync.step() if o.finished})
    for i, outs in enumerate(streams):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        ids = [o.outputs[0].token_ids for o in outs]
        assert all(a == b[: len(a)] and len(a) < len(b) for a, b in zip(ids, ids[1:])), "outputs are not cumulative"
        assert ids[-1] == want[f"r{i}"].outputs[0].token_ids
    assert engine.num_in_flight == 0


def test_closing_the_consumer_aborts_and_frees_blocks(make_engine) -> None:
    engine = make_engine()

    async def main() -> None:
        gen = engine.generate({"prompt_token_ids": [5] * 40}, LONG, "long")
        for _ in range(3):
            out = await gen.__anext__()
        assert not out.finished
        await wait_until(lambda: engine.snapshot.num_free_blocks < engine.snapshot.num_total_blocks, "blocks in use")
        await gen.aclose()  # the consumer leaves mid-request
        await wait_until(lambda: engine.snapshot.num_aborted_requests == 1, "the abort")
        await wait_until(lambda: all_free(engine.snapshot), "all blocks free")
        assert engine.snapshot.generation_tokens < 200
        assert engine.num_in_flight == 0

    run(main())


def test_a_cancelled_consumer_aborts(make_engine) -> None:
    engine = make_engine()

    async def consume() -> None:
        async for _ in engine.generate({"prompt_token_ids": [7] * 20}, LONG, "c"):
            pass

    async def main() -> None:
        task = asyncio.ensure_future(consume())
        await wait_until(lambda: engine.snapshot.generation_tokens >= 3, "tokens")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.snapshot.num_aborted_requests == 1 and all_free(engine.snapshot), "abort")

    run(main())


def test_engine_failure_fails_every_request_and_marks_unhealthy(make_engine, monkeypatch) -> None:
    engine = make_engine()
    real_step = engine.engine.step
    calls = {"n": 0}

    def failing_step() -> list[RequestOutput]:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated device failure")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", failing_step)

    async def consume(i: int) -> None:
        async for _ in engine.generate({"prompt_token_ids": [5 + i] * 10}, LONG, f"f{i}"):
            pass

    async def main() -> None:
        results = await asyncio.gather(*(consume(i) for i in range(4)), return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "simulated device failure" in str(results[0])
        assert not engine.is_healthy and isinstance(engine.error, RuntimeError)
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", {"prompt_token_ids": [5]}, LONG)
        assert engine.num_in_flight == 0

    run(main())


def test_rejected_request_raises_value_error_and_engine_keeps_serving(make_engine) -> None:
    engine = make_engine()

    async def main() -> None:
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request("too-long", {"prompt_token_ids": [5] * 300}, LONG)
        assert engine.num_in_flight == 0 and engine.is_healthy
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        outs = [o async for o in engine.generate({"prompt_token_ids": [5, 6]}, params, "ok")]
        assert len(outs[-1].outputs[0].token_ids) == 4

    run(main())


def test_queue_bound(make_engine, monkeypatch) -> None:
    engine = make_engine(max_queued_requests=2)
    gate = threading.Event()
    real_step = engine.engine.step

    def gated_step() -> list[RequestOutput]:
        gate.wait(TIMEOUT)
        return real_step()

    monkeypatch.setattr(engine.engine, "step", gated_step)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def main() -> None:
        # The engine thread sits in its first step, so nothing counts as running: two may wait, a third may not.
        s1 = await engine.add_request("q1", {"prompt_token_ids": [5, 6]}, params)
        # q2 passes the bound and is queued; its acceptance waits for the gated step to end.
        pending = asyncio.ensure_future(engine.add_request("q2", {"prompt_token_ids": [7, 8]}, params))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await engine.add_request("q3", {"prompt_token_ids": [9, 10]}, params)
        gate.set()
        s2 = await pending
        for s in (s1, s2):
            outs = [o async for o in s]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
        assert engine.num_in_flight == 0

    try:
        run(main())
    finally:
        gate.set()


def test_shutdown_fails_in_flight_requests(make_engine) -> None:
    engine = make_engine()

    async def main() -> None:
        gen = engine.generate({"prompt_token_ids": [5] * 8}, LONG, "s")
        await gen.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            await engine.add_request("after", {"prompt_token_ids": [5]}, LONG)

    run(main())


class RecordingObserver:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.ttft: list[float] = []
        self.intervals: list[float] = []
        self.finished: list[str] = []

    def on_step(self, num_seqs: int, snapshot: EngineSnapshot) -> None:
        self.steps.append(num_seqs)

    def on_first_token(self, seconds_since_arrival: float) -> None:
        self.ttft.append(seconds_since_arrival)

    def on_token_interval(self, seconds: float) -> None:
        self.intervals.append(seconds)

    def on_request_finished(self, reason: str, e2e_seconds: float) -> None:
        self.finished.append(reason)


def test_observer_sees_batches_first_tokens_and_intervals(make_engine) -> None:
    observer = RecordingObserver()
    engine = make_engine(observer=observer)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def main() -> None:
        streams = await engine.add_requests([(f"o{i}", {"prompt_token_ids": [5 + i] * 4}, params) for i in range(4)])
        for s in streams:
            async for _ in s:
                pass

    run(main())
    assert len(observer.ttft) == 4 and all(t > 0 for t in observer.ttft)
    assert len(observer.intervals) == 4 * 5
    assert observer.finished == ["length"] * 4
    assert max(observer.steps) == 4  # added together, so they ran together
