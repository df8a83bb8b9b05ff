"""No per-request leak in the serving process: the real app and engine in-process (starlette's TestClient),
identical waves of mixed requests, and a count of every live Python object by type before and after.

A request that leaves anything behind — an output, a stream, a detokenizer state, a seeded sampler generator,
a closure in a metrics callback — grows some type by at least one object per request, and the waves send 48
requests between successive counts. (Resident memory is too noisy for this in a short test: it also moves with
the allocator's fragmentation; benchmarks/soak.py follows it over minutes.)
"""

from __future__ import annotations

import collections
import gc
import json
import pathlib
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nanoserve.config import EngineConfig
from nanoserve.engine.async_engine import AsyncLLMEngine
from nanoserve.engine.llm_engine import LLMEngine, load_tokenizer
from nanoserve.server.app import build_app
from nanoserve.server.metrics import ServerMetrics
from nanoserve.server.serving import ServerSettings

WAVE = 24
MAX_NUM_SEQS = 4
# Below one object per request of a wave: what a real leak would add is at least 2 * WAVE.
TOLERANCE = WAVE // 2


def make_requests(seed: int) -> list[tuple[str, dict[str, Any]]]:
    """A wave: completions and chat, streamed or not, n=1/2, greedy, sampled, seeded, logprobs, stop strings,
    and a few invalid ones."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    out = []
    for i in range(WAVE):
        body: dict[str, Any] = {"max_tokens": rng.randint(1, 24), "stream": i % 2 == 0, "n": rng.choice([1, 1, 2])}
        body["temperature"] = rng.choice([0, 1.0])
        if i % 3 == 0:
            body["seed"] = rng.randrange(1 << 20)
        if i % 4 == 1:
            body["stop"] = rng.sample(words, 2)
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # ~5 tokens a word
        if i % 5 == 0:
            body.update(messages=[{"role": "user", "content": text}], logprobs=True, top_logprobs=2)
            path = "/v1/chat/completions"
        else:
            body.update(prompt=text, logprobs=1 if i % 5 == 1 else None)
            path = "/v1/completions"
        if i % 8 == 7:
            body["temperature"] = -1  # a 400
        out.append((path, body))
    return out


def live_objects_by_type() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


@pytest.fixture
def app_client(reliability_model: pathlib.Path) -> Any:
    config = EngineConfig.create(str(reliability_model), max_model_len=128, kv_cache_memory=12 * 8192,
                                 max_num_seqs=MAX_NUM_SEQS, seed=0)  # fmt: skip
    metrics = ServerMetrics()
    engine = AsyncLLMEngine(LLMEngine(config), observer=metrics)
    settings = ServerSettings(served_model_names=("tiny",), model_path=str(reliability_model))
    app = build_app(engine, load_tokenizer(config.tokenizer), settings, metrics)
    with TestClient(app, raise_server_exceptions=True) as client:
        yield client, engine


def test_identical_waves_leave_no_python_objects_behind(app_client) -> None:
    client, engine = app_client
    requests = make_requests(seed=3)

    def one(item: tuple[str, dict[str, Any]]) -> int:
        path, body = item
        if not body["stream"]:
            return client.post(path, json=body).status_code
        with client.stream("POST", path, json=body) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        if r.status_code == 200:
            assert events[-1] == "data: [DONE]" and all("error" not in json.loads(e[6:]) for e in events[:-1])
        return r.status_code

    def wave() -> None:
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(one, requests))
        assert statuses.count(400) == WAVE // 8 and statuses.count(200) == WAVE - WAVE // 8, statuses

    # Two warm-up waves: first-use caches (token strings, tokenizer, regexes, thread pools) fill here. Then
    # counts after two more waves and after two more again: a leak grows in both intervals, while a one-off
    # (an ABC's isinstance cache refilled after some late import registered a class) grows in one only.
    wave()
    wave()
    counts = [live_objects_by_type()]
    for _ in range(2):
        wave()
        wave()
        counts.append(live_objects_by_type())
    grown = {
        kind: (counts[1][kind] - counts[0][kind], counts[2][kind] - counts[1][kind])
        for kind in counts[2]
        if min(counts[1][kind] - counts[0][kind], counts[2][kind] - counts[1][kind]) > TOLERANCE
    }
    assert not grown, f"objects left behind by every {2 * WAVE} requests: {grown}"

    # The per-request tables themselves are empty once the engine is idle.
    core = engine.engine
    assert not core.requests and not core.has_unfinished_requests()
    assert not core.scheduler.running and not core.scheduler.waiting
    assert not core.sampler._seq_generators, "seeded generators of finished sequences are kept"
    assert not engine._tracked and engine.num_in_flight == 0
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    # The runner forgets a finished sequence's table with the next step's message: at most one step's worth.
    assert len(core.executor.runner.block_tables) <= MAX_NUM_SEQS
