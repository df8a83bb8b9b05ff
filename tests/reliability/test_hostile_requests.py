"""Hostile and random requests against one ``nanoserve serve``: every one is answered with a 2xx or a 4xx that
says what was wrong — never a 5xx, never a hang — and the server still serves afterwards.

Two halves:
- hand-written hostile inputs (huge ``n`` / ``max_tokens`` / ``logprobs``, token ids outside the vocabulary,
  thousands of stop strings, 100 MB and deeply nested bodies, invalid UTF-8, NaN, bignums, negative seeds,
  bodies that stall or trickle in: "slowloris");
- schemathesis fuzzing from the server's own OpenAPI schema (``/openapi.json``) of ``/v1/completions`` and
  ``/v1/chat/completions``: schema-valid bodies (which reach the engine) and schema-violating ones.

The server runs with a short context (64 tokens) so that a fuzzed request that fills it stays quick, and a short
request-body timeout (3 s) so that the slowloris test does not wait the default 30 s.
"""

from __future__ import annotations

import collections
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.reliability.conftest import ServerHandle, scrape, server_rss, wait_idle_and_all_blocks_free

MAX_MODEL_LEN = 64
VOCAB = 512  # the tiny checkpoint's
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
MiB = 2**20
# A request to this server finishes in well under a second; far beyond that is a hang.
REQUEST_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 3.0  # --request-body-timeout: every request body here arrives in milliseconds
# Fuzzing budget: examples per (endpoint, mode); with a 64-token context the four runs take ~30-50 s on 2 cores.
FUZZ_EXAMPLES = {"positive": 60, "negative": 40}


@pytest.fixture(scope="module")
def server(launch: Any) -> ServerHandle:
    return launch(["--max-model-len", str(MAX_MODEL_LEN), "--request-body-timeout", str(BODY_TIMEOUT_S)])


@pytest.fixture(scope="module")
def http(server: ServerHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S) as c:
        yield c


def assert_still_serving(server: ServerHandle, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    r = http.post(CMPL, json={"prompt": "still there?", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert "Traceback" not in server.log(), server.log()


def assert_client_error(r: httpx.Response, status: int, says: str, param: str | None = None) -> None:
    """A 4xx in the OpenAI error shape whose message contains ``says`` (and names ``param``, if given)."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"], error
    assert error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["param"] == param, error


# ---- hand-written hostile inputs ---------------------------------------------------------------------
HOSTILE_JSON = [
    # (id, path, body, expected status, message fragment, param)
    ("n-huge", CMPL, {"prompt": "hi", "n": 10**9}, 400, "between 1 and 64", "n"),
    ("n-huge-chat", CHAT, {"messages": USER, "n": 10**18}, 400, "between 1 and 64", "n"),
    ("max_tokens-huge", CMPL, {"prompt": "hi", "max_tokens": 10**30}, 400, "maximum context length", "max_tokens"),
    (
        "max_tokens-int64-overflow",
        CMPL,
        {"prompt": "hi", "max_tokens": 2**63},
        400,
        "maximum context length",
        "max_tokens",
    ),
    (
        "max_completion_tokens-huge",
        CHAT,
        {"messages": USER, "max_completion_tokens": 10**12},
        400,
        "maximum context length",
        "max_completion_tokens",
    ),
    ("logprobs-beyond-limit", CMPL, {"prompt": "hi", "logprobs": 21}, 400, "between 0 and 20", "logprobs"),
    ("logprobs-huge", CMPL, {"prompt": "hi", "logprobs": 10**20}, 400, "between 0 and 20", "logprobs"),
    (
        "top_logprobs-beyond-limit",
        CHAT,
        {"messages": USER, "logprobs": True, "top_logprobs": 21},
        400,
        "between 0 and 20",
        "top_logprobs",
    ),
    ("token-id-negative", CMPL, {"prompt": [5, -1]}, 400, "outside the vocabulary", "prompt"),
    ("token-id-beyond-vocab", CMPL, {"prompt": [5, VOCAB]}, 400, "outside the vocabulary", "prompt"),
    ("token-id-bignum", CMPL, {"prompt": [2**70]}, 400, "outside the vocabulary", "prompt"),
    ("token-id-in-second-prompt", CMPL, {"prompt": [[1, 2], [10**6]]}, 400, "outside the vocabulary", "prompt"),
    (
        "stop_token_id-beyond-vocab",
        CMPL,
        {"prompt": "hi", "stop_token_ids": [10**30]},
        400,
        "outside the vocabulary",
        "stop_token_ids",
    ),
    (
        "stop-5000-strings",
        CMPL,
        {"prompt": "hi", "stop": [f"s{i}" for i in range(5000)]},
        400,
        "at most 64 stop strings",
        "stop",
    ),
    ("stop-empty-string", CMPL, {"prompt": "hi", "stop": [""]}, 400, "non-empty strings", "stop"),
    ("prompts-5000", CMPL, {"prompt": ["hi"] * 5000, "max_tokens": 1}, 400, "at most 1024 prompts", "prompt"),
    ("prompts-times-n", CMPL, {"prompt": ["hi"] * 100, "n": 64, "max_tokens": 1}, 400, "100 x 64", "n"),
    ("messages-20000", CHAT, {"messages": USER * 20000, "max_tokens": 1}, 400, "maximum context length", "messages"),
    (
        "min_tokens-bignum",
        CMPL,
        {"prompt": "hi", "min_tokens": 10**30},
        400,
        "must not exceed max_tokens",
        "min_tokens",
    ),
]

HOSTILE_BYTES = [
    # (id, path, raw body, expected status, message fragment)
    ("nested-100k-arrays", CMPL, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "recursion limit"),
    (
        "nested-50k-objects",
        CMPL,
        b'{"x": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b', "prompt": "hi"}',
        400,
        "recursion limit",
    ),
    ("invalid-utf8", CMPL, b'{"prompt": "\xff\xfe\xc3\x28 hi"}', 400, "invalid unicode"),
    ("invalid-utf8-in-key", CHAT, b'{"mess\xffages": []}', 400, "invalid unicode"),
    ("lone-surrogate-escape", CMPL, b'{"prompt": "\\ud800 hi"}', 400, "hex escape"),
    ("lone-surrogate-in-stop", CMPL, b'{"prompt": "hi", "stop": ["\\udfff"]}', 400, "hex escape"),
    ("utf16-body", CMPL, '{"prompt": "hi"}'.encode("utf-16"), 400, "Invalid JSON"),
    ("nan-temperature", CMPL, b'{"prompt": "hi", "temperature": NaN}', 400, "finite number"),
    ("infinite-repetition_penalty", CMPL, b'{"prompt": "hi", "repetition_penalty": Infinity}', 400, "finite number"),
    ("5000-digit-integer", CMPL, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, "out of range"),
    ("5000-digit-float", CMPL, b'{"prompt": "hi", "temperature": 1' + b"0" * 5000 + b".0}", 400, "out of range"),
    ("trailing-garbage", CMPL, b'{"prompt": "hi"} {"prompt": "again"}', 400, "trailing characters"),
    ("json-null", CMPL, b"null", 400, "should be an object"),
]


@pytest.mark.parametrize("path,body,status,says,param", [c[1:] for c in HOSTILE_JSON], ids=[c[0] for c in HOSTILE_JSON])
def test_hostile_json_gets_a_clear_4xx(server, http, path, body, status, says, param) -> None:
    t0 = time.monotonic()
    assert_client_error(http.post(path, json=body), status, says, param)
    assert time.monotonic() - t0 < 10, "a request that is rejected must not cost seconds"


@pytest.mark.parametrize("path,raw,status,says", [c[1:] for c in HOSTILE_BYTES], ids=[c[0] for c in HOSTILE_BYTES])
def test_hostile_bytes_get_a_clear_4xx(server, http, path, raw, status, says) -> None:
    assert_client_error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), status, says)


def _body_of(total: int, chunk: int = MiB) -> Iterator[bytes]:
    """A JSON body of ``total`` bytes, produced lazily: httpx sends it chunked (no Content-Length)."""
    yield b'{"prompt": "'
    for _ in range(total // chunk):
        yield b"x" * chunk
    yield b'"}'


def test_100mb_bodies_are_refused_while_streaming_in(server, http) -> None:
    """413 whether or not the client announces the size, and the server never holds the body: its memory does
    not grow by anything near 100 MB (the limit is 4 MiB; the check reads the stream and stops)."""
    before = server_rss(server.proc.pid)
    r = http.post(CMPL, content=_body_of(100 * MiB), headers={"Content-Type": "application/json"})
    assert_client_error(r, 413, "exceeds the limit of 4194304 bytes")
    assert r.json()["error"]["code"] == "request_too_large"
    announced = b'{"prompt": "' + b"x" * (100 * MiB) + b'"}'
    r = http.post(CMPL, content=announced, headers={"Content-Type": "application/json"})
    assert_client_error(r, 413, f"request body of {len(announced)} bytes exceeds the limit")
    del announced
    grown = server_rss(server.proc.pid) - before
    assert grown < 32 * MiB, f"server memory grew by {grown / MiB:.0f} MiB while refusing 100 MB bodies"
    assert_still_serving(server, http)


def test_a_client_leaving_halfway_through_its_body_is_not_an_error(server, http) -> None:
    """Headers promise 1000 bytes, 20 arrive, the client closes: the server drops it quietly (no 500, no
    traceback in its log) and keeps serving."""
    host, port = server.base_url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "half a b')  # fmt: skip
            time.sleep(0.2)
    assert_still_serving(server, http)  # includes: no traceback in the server log


@dataclass
class SlowClient:
    """A raw-socket client that sends its headers (promising a 1000-byte body), then a few body bytes, then
    either nothing more (``trickle_s=None``: stalled) or one byte every ``trickle_s`` seconds until the server
    answers. Records what came back and when, measured from before the headers left."""

    address: tuple[str, int]
    trickle_s: float | None
    response: bytes = b""
    closed_by_server: bool = False
    elapsed_s: float = 0.0
    headers_sent: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        start = time.monotonic()
        with socket.create_connection(self.address, timeout=REQUEST_TIMEOUT_S) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "slow')  # fmt: skip
            self.headers_sent.set()
            deadline = start + REQUEST_TIMEOUT_S
            # Keep sending until the server speaks (or the test's patience ends): never write after its answer,
            # which it follows by closing, so the answer is not lost to a reset.
            while time.monotonic() < deadline:
                readable, _, _ = select.select([sock], [], [], self.trickle_s or 0.5)
                if readable:
                    break
                if self.trickle_s is not None:
                    sock.sendall(b"w")
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(65536)
                except TimeoutError:  # the server kept the connection open
                    break
                except ConnectionResetError:
                    # The server closed, and a trickled byte that crossed its answer on the wire drew a reset:
                    # closed all the same (a connection it kept open would end in the timeout above).
                    self.closed_by_server = True
                    break
                if not data:
                    self.closed_by_server = True
                    break
                self.response += data
                self.elapsed_s = self.elapsed_s or time.monotonic() - start


def test_a_stalled_or_trickling_body_gets_408_and_does_not_hold_the_server(server, http) -> None:
    """Slowloris: clients that send their headers and then stall, or trickle a byte every 0.2 s (which a
    per-chunk idle timeout would never catch), get a 408 in the OpenAI error shape once --request-body-timeout
    has passed, and their connections are closed. Meanwhile the server answers everyone else as usual and the
    slow clients hold no request (nothing in flight, no KV block)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    clients = [SlowClient((host, int(port)), trickle_s) for trickle_s in (None, None, 0.2, 0.2)]
    threads = [threading.Thread(target=c.run) for c in clients]
    for t in threads:
        t.start()
    for c in clients:
        assert c.headers_sent.wait(REQUEST_TIMEOUT_S)
    served = http.post(CMPL, json={"prompt": "meanwhile", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert served.status_code == 200, served.text
    assert scrape(server.base_url)["nanoserve_num_requests_in_flight"] == 0
    for t in threads:
        t.join(REQUEST_TIMEOUT_S + 5)
        assert not t.is_alive()
    for c in clients:
        what = "stalled" if c.trickle_s is None else "trickling"
        head, _, body = c.response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), f"{what} client got {c.response[:200]!r}"
        assert b"connection: close" in head.lower(), head
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and f"within {BODY_TIMEOUT_S:g} s" in error["message"], error
        assert error["type"] == "invalid_request_error", error
        assert c.closed_by_server, f"the server kept the {what} client's connection open after its 408"
        assert BODY_TIMEOUT_S <= c.elapsed_s < BODY_TIMEOUT_S + 20, f"{what} client answered after {c.elapsed_s:.1f} s"
    assert_still_serving(server, http)


def test_negative_and_huge_seeds_are_accepted_and_reproducible(server, http) -> None:
    """OpenAI allows any integer seed; so do we (the sampler folds it into its generator's range)."""
    texts = {}
    for seed in (-1, -(2**70), 2**64 + 5):
        body = {"prompt": "seeded", "max_tokens": 8, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        first, second = http.post(CMPL, json=body), http.post(CMPL, json=body)
        assert first.status_code == second.status_code == 200, first.text
        texts[seed] = first.json()["choices"][0]["text"]
        assert second.json()["choices"][0]["text"] == texts[seed], f"seed {seed} is not reproducible"


def test_top_k_bignum_is_no_limit_and_does_not_kill_the_engine(server, http) -> None:
    """top_k=10**30 once failed the sampler's int64 tensor and took the engine (and every request) down."""
    greedy = {"prompt": "top k", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = http.post(CMPL, json=greedy).json()["choices"][0]["text"]
    for top_k in (10**30, VOCAB, VOCAB + 1):
        r = http.post(CMPL, json={**greedy, "top_k": top_k})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
    assert_still_serving(server, http)


def test_hostile_requests_leave_nothing_behind(server, http) -> None:
    """After everything above (this runs after the hostile tests in file order): no stuck request, no block
    held, engine healthy."""
    m = wait_idle_and_all_blocks_free(server.base_url)
    assert m["nanoserve_engine_healthy"] == 1
    assert_still_serving(server, http)


# ---- fuzzing from the OpenAPI schema -----------------------------------------------------------------
@pytest.fixture(scope="module")
def api_schema(server: ServerHandle) -> Any:
    return schemathesis.openapi.from_url(server.url("/openapi.json"))


def test_openapi_schema_documents_the_request_bodies(server, http) -> None:
    """The fuzzer can only be as good as the schema: each body names its fields (the routes parse bodies
    themselves, so FastAPI would otherwise document none)."""
    spec = http.get("/openapi.json").json()
    for path, model in ((CMPL, "CompletionRequest"), (CHAT, "ChatCompletionRequest")):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "n", "logprobs", "stop", "seed", "stream"} <= props.keys()
    assert spec["components"]["schemas"]["CompletionRequest"]["required"] == ["prompt"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_fuzzed_requests_never_get_a_5xx_or_hang(server, http, api_schema, path, mode) -> None:
    """``positive``: bodies valid under the schema (many reach the engine and generate); ``negative``: bodies
    that violate it. Each gets an answer below 500 within the timeout (a hang fails with a read timeout)."""
    strategy = api_schema[path]["POST"].as_strategy(generation_mode=GenerationMode(mode))
    statuses: collections.Counter[int] = collections.Counter()

    # derandomize: the same examples on every run, so CI is reproducible; database=None: nothing on disk.
    @settings(max_examples=FUZZ_EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=strategy)
    def one(case: Any) -> None:
        response = case.call(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S)
        statuses[response.status_code] += 1
        assert response.status_code < 500, f"{response.status_code} for {json.dumps(case.body)[:2000]}: {response.text}"
        if response.status_code >= 400:
            assert "message" in response.json()["error"], response.text

    one()
    if mode == "positive":
        assert statuses[200] > 0, f"no fuzzed request reached the engine: {dict(statuses)}"
    else:
        assert set(statuses) <= {400, 404, 413}, dict(statuses)
    wait_idle_and_all_blocks_free(server.base_url)
    assert_still_serving(server, http)
    assert scrape(server.base_url)["nanoserve_engine_healthy"] == 1
