"""Reliability fixtures: ``nanoserve serve`` subprocesses built with the server tests' helpers, plus probes of
a server from outside (its Prometheus gauges, its resident memory).

Each test module starts the one server it needs (module scope) and the fixture stops it by PID afterwards.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanoserve.testing.checkpoints import build_checkpoint
from tests.server.conftest import MAX_MODEL_LEN, ServerHandle, start_server, stop_server

__all__ = ["ServerHandle", "scrape", "server_rss", "wait_until", "wait_idle_and_all_blocks_free"]


@pytest.fixture(scope="session")
def reliability_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The server tests' tiny Qwen3 (same shape and seed), built once for this directory."""
    root = tmp_path_factory.mktemp("reliability_model")
    return build_checkpoint(root / "tiny-qwen3", "qwen3", max_position_embeddings=MAX_MODEL_LEN, seed=7)


@pytest.fixture(scope="module")
def launch(
    reliability_model: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[list[str]], ServerHandle]]:
    """``launch(extra_flags) -> ServerHandle``: a server on the tiny model (the server tests' engine options,
    overridden by ``extra_flags``); every one still running is stopped when the module ends."""
    started: list[ServerHandle] = []

    def start(extra: list[str]) -> ServerHandle:
        handle = start_server(reliability_model, tmp_path_factory.mktemp("server_log") / "server.log", extra)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        stop_server(handle.proc)


def scrape(base_url: str) -> dict[str, float]:
    """Every sample of ``/metrics`` by name (labels included: ``name{label="v"}``)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


def wait_idle_and_all_blocks_free(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """Wait until nothing runs, waits or is in flight and every KV block is free; returns that scrape."""
    last: dict[str, float] = {}

    def idle() -> bool:
        nonlocal last
        last = scrape(base_url)
        return (
            last["nanoserve_num_requests_running"] == 0
            and last["nanoserve_num_requests_waiting"] == 0
            and last["nanoserve_num_requests_in_flight"] == 0
            and last["nanoserve_kv_blocks_free"] == last["nanoserve_kv_blocks_total"]
        )

    try:
        wait_until(idle, timeout, "the server to be idle with every KV block free")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last scrape: { {k: v for k, v in last.items() if 'bucket' not in k} }") from None
    return last


def server_rss(pid: int) -> int:
    """Resident bytes of a server process and all its children (tensor-parallel workers included)."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total
