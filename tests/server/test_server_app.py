"""The FastAPI app in-process (starlette's TestClient): the cases a healthy subprocess server cannot show — a
tokenizer without a chat template, an engine that dies, a full queue — plus the token display rules."""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nanoserve.config import EngineConfig
from nanoserve.engine.async_engine import AsyncLLMEngine
from nanoserve.engine.llm_engine import LLMEngine, load_tokenizer
from nanoserve.server.app import build_app
from nanoserve.server.metrics import ServerMetrics
from nanoserve.server.serving import ServerSettings
from nanoserve.server.tokens import TokenStrings

OPTIONS = dict(max_model_len=256, kv_cache_memory="4MiB", max_num_seqs=64, seed=0)
NAME = "tiny"


@pytest.fixture
def make_client(tiny_model: pathlib.Path) -> Iterator[Callable[..., tuple[TestClient, AsyncLLMEngine]]]:
    clients: list[TestClient] = []

    def make(tokenizer: Any = None, **engine_kwargs: Any) -> tuple[TestClient, AsyncLLMEngine]:
        config = EngineConfig.create(str(tiny_model), **OPTIONS)
        metrics = ServerMetrics()
        engine = AsyncLLMEngine(LLMEngine(config), observer=metrics, **engine_kwargs)
        settings = ServerSettings(served_model_names=(NAME,), model_path=str(tiny_model))
        app = build_app(engine, tokenizer or load_tokenizer(config.tokenizer), settings, metrics)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()  # runs the lifespan: starts the engine thread
        clients.append(client)
        return client, engine

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def error_of(resp: Any, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_chat_without_a_template_is_a_clear_400(make_client, tiny_model) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    client, _ = make_client(tokenizer=tokenizer)
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    err = error_of(resp, 400)
    assert err["code"] == "no_chat_template" and "chat template" in err["message"]
    # Completions still work.
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_engine_death_gives_503_and_unhealthy(make_client, monkeypatch) -> None:
    client, engine = make_client()
    assert client.get("/health").status_code == 200

    def broken_step() -> list:
        raise RuntimeError("simulated worker crash")

    monkeypatch.setattr(engine.engine, "step", broken_step)
    # Streaming: the headers are already out, so the failure arrives in-band, then the stream ends.
    with client.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True}) as resp:
        body = resp.read().decode()
    assert resp.status_code == 200
    assert '"engine_dead"' in body and "simulated worker crash" in body and body.endswith("data: [DONE]\n\n")
    err = error_of(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5}), 503)
    assert err["code"] == "engine_dead"
    assert error_of(client.get("/health"), 503)["code"] == "engine_dead"
    assert "nanoserve_engine_healthy 0.0" in client.get("/metrics").text


def test_full_queue_gives_503(make_client) -> None:
    client, _ = make_client(max_queued_requests=0)
    err = error_of(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}), 503)
    assert err["code"] == "queue_full"


def test_unknown_route_and_method_use_the_error_shape(make_client) -> None:
    client, _ = make_client()
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "not_found_error"
    error_of(client.get("/v1/completions"), 405)


def test_token_strings_are_exact_bytes_and_never_collide(tiny_model) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    strings = TokenStrings(tokenizer)
    text = "naïve café — 日本語 ✓ plain words"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert b"".join(strings(t)[1] for t in ids) == text.encode()
    shown = [strings.text(t) for t in range(len(tokenizer))]
    assert len(set(shown)) == len(shown), "two tokens are shown the same way"
    assert any(s.startswith("bytes:\\x") for s in shown)  # the vocabulary has partial-character tokens


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_serve_refuses_a_request_body_timeout_that_is_not_positive(value: str, capsys) -> None:
    """Checked before anything loads: exit status 2 and a message naming the flag."""
    from nanoserve.cli import main

    assert main(["serve", "--request-body-timeout", value]) == 2
    assert "--request-body-timeout must be > 0 seconds" in capsys.readouterr().err
