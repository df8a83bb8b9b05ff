"""Server test fixtures: one tiny checkpoint and one ``nanoserve serve`` subprocess for the whole session.

The server listens on a free port on 127.0.0.1 (``--port 0``; it prints the port it got), requires an API key,
and is stopped by PID when the session ends.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from nanoserve.testing.checkpoints import build_checkpoint

MAX_MODEL_LEN = 256
SERVED_NAME = "tiny-qwen3"
API_KEY = "sk-test-nanoserve"
# Options shared by the server and by any in-process engine compared with it (same numerics).
ENGINE_OPTIONS = dict(max_model_len=MAX_MODEL_LEN, kv_cache_memory="4MiB", max_num_seqs=64, seed=0)
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServerHandle:
    base_url: str
    proc: subprocess.Popen
    log_path: pathlib.Path
    model_path: pathlib.Path
    served_name: str = SERVED_NAME
    api_key: str = API_KEY
    max_model_len: int = MAX_MODEL_LEN
    engine_options: tuple[tuple[str, object], ...] = tuple(ENGINE_OPTIONS.items())

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("server_model")
    return build_checkpoint(root / "tiny-qwen3", "qwen3", max_position_embeddings=MAX_MODEL_LEN, seed=7)


def _engine_flags() -> list[str]:
    flags = []
    for key, value in ENGINE_OPTIONS.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def start_server(model: pathlib.Path, log_path: pathlib.Path, extra: list[str]) -> ServerHandle:
    """Start ``nanoserve serve`` on a free port and wait (bounded) until /health answers 200."""
    cmd = [sys.executable, "-m", "nanoserve.cli", "serve", str(model), "--host", "127.0.0.1", "--port", "0",
           *_engine_flags(), *extra]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        base_url = None
        while base_url is None:
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
            if m:
                base_url = m.group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server did not start (exit {proc.poll()}):\n{log_path.read_text(errors='replace')}"
                )
            else:
                time.sleep(0.1)
        while True:
            try:
                if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server never became healthy:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.1)
    except BaseException:
        stop_server(proc)
        raise
    return ServerHandle(base_url, proc, log_path, model)


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM (graceful), then SIGKILL if it does not exit in time. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="session")
def server(tiny_model: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    handle = start_server(tiny_model, log_path, ["--served-model-name", SERVED_NAME, "--api-key", API_KEY])
    try:
        yield handle
    finally:
        stop_server(handle.proc)


@pytest.fixture(scope="session")
def launch_server(
    tiny_model: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[list[str]], ServerHandle]]:
    """``launch_server(extra_flags) -> ServerHandle``: another server on the tiny model; stopped at the end
    of the session at the latest (stop it earlier with ``stop_server(handle.proc)``)."""
    started: list[ServerHandle] = []

    def launch(extra: list[str]) -> ServerHandle:
        handle = start_server(tiny_model, tmp_path_factory.mktemp("server_log") / "server.log", extra)
        started.append(handle)
        return handle

    yield launch
    for handle in started:
        stop_server(handle.proc)


@pytest.fixture(scope="session")
def client(server: ServerHandle) -> Iterator[openai.OpenAI]:
    """The official OpenAI client pointed at the server (no retries: every failure must show)."""
    c = openai.OpenAI(base_url=server.url("/v1"), api_key=server.api_key, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(server: ServerHandle) -> Iterator[httpx.Client]:
    """Raw HTTP with the API key, for exact status codes and bodies."""
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120
    ) as c:
        yield c
