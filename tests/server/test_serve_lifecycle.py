"""A second server (one running sequence, one queued request at most, no API key): the queue bound answers 503,
and SIGTERM lets an in-flight stream finish before the process exits. The tests run in file order; the last
one stops the server."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanoserve.testing.checkpoints import build_checkpoint
from tests.server.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Its own checkpoint with a long context, so one request can run for seconds: the tiny model decodes
    # 240 tokens in about 0.1 s, faster than a test can look at the queue.
    root = tmp_path_factory.mktemp("lifecycle")
    model = build_checkpoint(root / "tiny-qwen3-long", "qwen3", max_position_embeddings=4096, seed=7)
    handle = start_server(model, root / "server.log",
                          ["--max-model-len", "4096", "--max-num-seqs", "1", "--max-queued-requests", "1"])  # fmt: skip
    try:
        yield handle
    finally:
        stop_server(handle.proc)


def gauge(server: Any, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(server.url("/metrics")).text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def wait_for_gauge(server: Any, name: str, value: float, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while gauge(server, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.05)


def long_body(prompt: str, max_tokens: int = 4000) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}


def test_queue_bound_answers_503(small_server: Any) -> None:
    with httpx.Client(base_url=small_server.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=long_body("first")) as first:
            assert first.status_code == 200
            wait_for_gauge(small_server, "nanoserve_num_requests_running", 1)
            with c.stream("POST", "/v1/completions", json=long_body("second")) as second:
                assert second.status_code == 200  # accepted: it waits for the one running slot
                wait_for_gauge(small_server, "nanoserve_num_requests_waiting", 1)
                third = httpx.post(small_server.url("/v1/completions"), json={"prompt": "third", "max_tokens": 2})
                assert third.status_code == 503, third.text
                assert third.json()["error"]["code"] == "queue_full"
    # Both streams were abandoned: their requests are aborted and the server takes work again.
    wait_for_gauge(small_server, "nanoserve_num_requests_in_flight", 0)
    ok = httpx.post(small_server.url("/v1/completions"), json={"prompt": "again", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_sigterm_lets_the_in_flight_stream_finish(small_server: Any) -> None:
    body = {**long_body("drain me", max_tokens=40), "stream_options": {"include_usage": True}}
    events = []
    with httpx.Client(base_url=small_server.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            small_server.proc.send_signal(signal.SIGTERM)
            events = [first] + [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 40
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"
    code = small_server.proc.wait(30)
    assert code in (0, -signal.SIGTERM), small_server.log()
    assert "Traceback" not in small_server.log(), small_server.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(small_server.url("/health"), timeout=2)
