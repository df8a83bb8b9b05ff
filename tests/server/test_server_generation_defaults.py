"""The server's default sampling settings from generation_config.json: they fill what a request leaves unset
(never what it sets), a default max_tokens caps the filled context as in vLLM, and /v1/models shows them."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from nanoserve.config import EngineConfig
from nanoserve.engine.async_engine import AsyncLLMEngine
from nanoserve.engine.llm_engine import LLMEngine, load_tokenizer
from nanoserve.generation_defaults import GenerationDefaults
from nanoserve.sampling_params import SamplingParams
from nanoserve.server.app import build_app
from nanoserve.server.serving import ServerSettings
from tests.server.conftest import MAX_MODEL_LEN, start_server, stop_server

OPTIONS = dict(max_model_len=MAX_MODEL_LEN, kv_cache_memory="4MiB", max_num_seqs=64, seed=0)
NAME = "tiny"
GENERATION_CONFIG = {
    "eos_token_id": [0, 2],
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 6,
}
DEFAULTS = dict(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05, max_tokens=6)


@pytest.fixture(scope="module")
def model(tiny_model: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The server's tiny checkpoint with Qwen3-style sampling recommendations in its generation_config.json."""
    path = tmp_path_factory.mktemp("generation_defaults") / "ckpt"
    shutil.copytree(tiny_model, path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return path


class Recorder:
    """The SamplingParams of every request the server hands to the engine."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.params: list[SamplingParams] = []
        add_requests = engine.add_requests

        async def spy(requests: list, *args: Any, **kwargs: Any) -> Any:
            self.params.extend(p for _, _, p in requests)
            return await add_requests(requests, *args, **kwargs)

        engine.add_requests = spy  # type: ignore[method-assign]

    def last(self) -> SamplingParams:
        return self.params[-1]


@pytest.fixture(scope="module")
def make_client(model: pathlib.Path) -> Iterator[Callable[..., tuple[TestClient, Recorder]]]:
    clients: list[TestClient] = []

    def make(
        generation_config: str = "auto", defaults: GenerationDefaults | None = None
    ) -> tuple[TestClient, Recorder]:
        config = EngineConfig.create(str(model), generation_config=generation_config, **OPTIONS)
        engine = AsyncLLMEngine(LLMEngine(config))
        recorder = Recorder(engine)
        settings = ServerSettings(served_model_names=(NAME,), model_path=str(model))
        app = build_app(engine, load_tokenizer(config.tokenizer), settings, generation_defaults=defaults)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()  # runs the lifespan: starts the engine thread
        clients.append(client)
        return client, recorder

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def auto(make_client) -> tuple[TestClient, Recorder]:
    return make_client()


def sampling(p: SamplingParams) -> dict[str, Any]:
    return {k: getattr(p, k) for k in DEFAULTS}


def completion(client: TestClient, **body: Any) -> dict:
    resp = client.post("/v1/completions", json={"prompt": "hello there", "ignore_eos": True, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_unset_fields_take_the_checkpoint_defaults(auto) -> None:
    client, recorder = auto
    body = completion(client)
    assert sampling(recorder.last()) == DEFAULTS
    assert body["usage"]["completion_tokens"] == 6  # max_new_tokens, not the completions default of 16


def test_explicit_nulls_take_the_defaults_too(auto) -> None:
    """As in vLLM, null means "the default": the server's, here; for max_tokens: the context, capped by it."""
    client, recorder = auto
    completion(client, temperature=None, top_p=None, top_k=None, repetition_penalty=None, max_tokens=None)
    assert sampling(recorder.last()) == DEFAULTS


def test_fields_the_request_sets_keep_its_values(auto) -> None:
    client, recorder = auto
    body = completion(client, temperature=1.0, top_k=0, repetition_penalty=1.0, max_tokens=3)
    assert sampling(recorder.last()) == dict(DEFAULTS, temperature=1.0, top_k=0, repetition_penalty=1.0, max_tokens=3)
    assert body["usage"]["completion_tokens"] == 3
    completion(client, max_tokens=16, top_p=1.0)  # the built-in default, set explicitly, is not replaced either
    assert (recorder.last().max_tokens, recorder.last().top_p) == (16, 1.0)


def test_chat_takes_the_defaults_and_keeps_what_it_sets(auto) -> None:
    client, recorder = auto
    messages = [{"role": "user", "content": "hi"}]
    resp = client.post("/v1/chat/completions", json={"messages": messages, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    assert sampling(recorder.last()) == DEFAULTS  # max_tokens: min(context left, 6)
    assert resp.json()["usage"]["completion_tokens"] == 6
    body = {"messages": messages, "max_completion_tokens": 2, "temperature": 0.0, "ignore_eos": True}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert (recorder.last().max_tokens, recorder.last().temperature, recorder.last().top_k) == (2, 0.0, 20)


def test_models_show_the_defaults_in_force(auto, make_client) -> None:
    client, _ = auto
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == NAME and card["object"] == "model" and card["max_model_len"] == MAX_MODEL_LEN
    assert card["default_sampling_params"] == DEFAULTS
    builtin, recorder = make_client("vllm")
    assert builtin.get("/v1/models").json()["data"][0]["default_sampling_params"] == {}
    completion(builtin)
    assert sampling(recorder.last()) == dict(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                             max_tokens=16)  # fmt: skip


def test_a_default_max_tokens_beyond_the_context_fills_only_the_context(make_client) -> None:
    client, recorder = make_client(defaults=GenerationDefaults({"max_tokens": 10 * MAX_MODEL_LEN}, "test"))
    body = completion(client)
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert recorder.last().max_tokens == MAX_MODEL_LEN - prompt_tokens
    # A request that asks for more than fits is still refused, default or not.
    resp = client.post("/v1/completions", json={"prompt": "hello there", "max_tokens": MAX_MODEL_LEN})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"


def test_serve_reports_the_defaults_at_start_up(model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    handle = start_server(model, tmp_path / "server.log", ["--served-model-name", NAME])
    try:
        assert "default sampling params: temperature=0.6, top_p=0.9, top_k=20" in handle.log()
        [card] = httpx.get(handle.url("/v1/models"), timeout=30).json()["data"]
        assert card["default_sampling_params"] == DEFAULTS
    finally:
        stop_server(handle.proc)
