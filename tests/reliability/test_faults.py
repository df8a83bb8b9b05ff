"""Faults while serving: a tensor-parallel worker process killed mid-stream, and while idle.

A dead worker can never be replaced inside a running server, so the promise is: every in-flight request ends
promptly with an error saying why (never a hang), ``/health`` turns 503 (so an orchestrator restarts the
server), new requests get 503, and the server still shuts down cleanly, leaving no process behind.

Client disconnects are covered by tests/server/test_openai_server.py (one client) and
tests/reliability/test_overload.py (many, under overload); SIGTERM by tests/server/test_serve_lifecycle.py (one
stream) and tests/reliability/test_overload.py (running and queued requests under overload).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import httpx
import psutil

from tests.reliability.conftest import ServerHandle, scrape, wait_until

CMPL = "/v1/completions"
# How long a failure may take to reach a client: the collective fails as soon as the worker's sockets close.
FAIL_WITHIN_S = 10.0


def long_body(prompt: str, stream: bool, max_tokens: int = 200) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


def tp_worker(server: ServerHandle) -> psutil.Process:
    """The rank-1 worker: the server's child started by multiprocessing's spawn (not its resource tracker)."""
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if any("spawn_main" in part for part in p.cmdline())]  # fmt: skip
    assert len(workers) == 1, workers
    return workers[0]


def assert_engine_dead_error(error: dict[str, Any]) -> None:
    assert error["code"] == "engine_dead", error
    assert "worker rank 1" in error["message"], error


def assert_stops_cleanly(server: ServerHandle, children: list[psutil.Process]) -> None:
    """SIGTERM: the server exits in bounded time without a traceback, and no child process outlives it."""
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(30)
    assert code in (0, -signal.SIGTERM), server.log()

    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)

    wait_until(all_gone, 15, "the server's child processes to exit")


def test_worker_killed_mid_stream_fails_requests_promptly_and_turns_unhealthy(launch: Any) -> None:
    server = launch(["-tp", "2"])
    children = psutil.Process(server.proc.pid).children(recursive=True)
    worker = tp_worker(server)
    outcomes: dict[str, Any] = {}
    started = threading.Barrier(4)  # 3 clients have their first output + the killer
    killed_at: list[float] = []

    def stream(name: str) -> None:
        events = []
        with httpx.stream("POST", server.url(CMPL), json=long_body(name, True), timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    if len(events) == 1:
                        started.wait(30)
        outcomes[name] = (time.monotonic(), events)

    def non_stream(name: str) -> None:
        def first_output_seen() -> bool:
            return scrape(server.base_url)["nanoserve_generation_tokens_total"] > 0

        t = threading.Thread(target=lambda: (wait_until(first_output_seen, 30, "a token"), started.wait(30)))
        t.start()
        r = httpx.post(server.url(CMPL), json=long_body(name, False), timeout=60)
        t.join()
        outcomes[name] = (time.monotonic(), r)

    threads = [threading.Thread(target=stream, args=(f"stream {i}",)) for i in range(2)]
    threads.append(threading.Thread(target=non_stream, args=("plain",)))
    for t in threads:
        t.start()
    started.wait(60)
    killed_at.append(time.monotonic())
    os.kill(worker.pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a request hangs after its worker died"

    for name in ("stream 0", "stream 1"):
        ended, events = outcomes[name]
        assert ended - killed_at[0] < FAIL_WITHIN_S
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])
        assert "error" in error, f"{name} ended without an error: {events[-3:]}"
        assert_engine_dead_error(error["error"])
        assert len(events) < 200, "the stream went on after the worker died"
    ended, r = outcomes["plain"]
    assert ended - killed_at[0] < FAIL_WITHIN_S
    assert r.status_code == 503, r.text
    assert_engine_dead_error(r.json()["error"])

    health = httpx.get(server.url("/health"), timeout=5)
    assert health.status_code == 503
    assert_engine_dead_error(health.json()["error"])
    assert scrape(server.base_url)["nanoserve_engine_healthy"] == 0
    again = httpx.post(server.url(CMPL), json=long_body("after", False, max_tokens=2), timeout=10)
    assert again.status_code == 503
    assert_engine_dead_error(again.json()["error"])
    assert_stops_cleanly(server, children)


def test_worker_killed_while_idle_turns_health_503_before_any_request(launch: Any) -> None:
    """No request needs the worker, yet /health notices (the idle engine thread checks its workers)."""
    server = launch(["-tp", "2"])
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert httpx.get(server.url("/health")).status_code == 200
    os.kill(tp_worker(server).pid, signal.SIGKILL)
    wait_until(lambda: httpx.get(server.url("/health")).status_code == 503, 5, "/health to report the dead worker")
    assert_engine_dead_error(httpx.get(server.url("/health")).json()["error"])
    r = httpx.post(server.url(CMPL), json=long_body("hello", False, max_tokens=2), timeout=10)
    assert r.status_code == 503
    assert_engine_dead_error(r.json()["error"])
    assert_stops_cleanly(server, children)
