"""Structured outputs over HTTP with the official openai client: every spelling clients send (chat's
``response_format``, vLLM's ``structured_outputs``, the older ``guided_*`` fields), streamed and not, n = 2,
compact JSON by request or by server flag, and 400s that name the field for invalid constraints.

Schemas bound every string and array and forbid extra properties, so a random-weight model's walk ends; the
tests assert what the constraint guarantees (every ``"stop"`` completion is valid) and that most stop.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerHandle, stop_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
# No free strings: a compact completion then equals its own compact re-serialisation, character for character.
CLOSED_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "c": {"enum": ["x", "y", True]},
                   "l": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["n", "c", "l"],
    "additionalProperties": False,
}  # fmt: skip
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
MESSAGES = [{"role": "user", "content": "Describe someone as JSON."}]


def _validate_stopped(texts_and_reasons: list[tuple[str, str | None]], schema: dict[str, Any]) -> int:
    stopped = 0
    for text, reason in texts_and_reasons:
        assert reason in ("stop", "length"), reason
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)
            stopped += 1
    return stopped


def test_chat_response_format_json_schema(client: openai.OpenAI, server: ServerHandle) -> None:
    got = []
    for seed in range(4):
        r = client.chat.completions.create(
            model=server.served_name, messages=MESSAGES, n=2, seed=seed, temperature=1.0, max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
            extra_body=COMPACT,
        )  # fmt: skip
        got += [(c.message.content, c.finish_reason) for c in r.choices]
    assert len(got) == 8
    assert _validate_stopped(got, SCHEMA) >= 6, got


def test_chat_streamed_json_reassembles_into_valid_json(client: openai.OpenAI, server: ServerHandle) -> None:
    for seed in range(3):
        stream = client.chat.completions.create(
            model=server.served_name, messages=MESSAGES, n=2, seed=seed, temperature=1.0, max_tokens=120, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}, extra_body=COMPACT,
        )  # fmt: skip
        texts, reasons = ["", ""], [None, None]
        for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                reasons[choice.index] = choice.finish_reason or reasons[choice.index]
        assert _validate_stopped(list(zip(texts, reasons)), SCHEMA) >= 1, (texts, reasons)


def test_chat_json_object(client: openai.OpenAI, server: ServerHandle) -> None:
    # Any JSON object: nothing bounds it, so only check what did finish (and that it is an object).
    r = client.chat.completions.create(
        model=server.served_name, messages=MESSAGES, n=4, seed=1, temperature=1.0, max_tokens=60,
        response_format={"type": "json_object"}, extra_body=COMPACT,
    )  # fmt: skip
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict), c.message.content
        else:
            assert c.message.content.startswith("{"), c.message.content


@pytest.mark.parametrize("spelling", ["structured_outputs", "guided_json"])
def test_completions_json(client: openai.OpenAI, server: ServerHandle, spelling: str) -> None:
    body = {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}
    if spelling == "guided_json":
        body = {"guided_json": SCHEMA, **COMPACT}
    r = client.completions.create(model=server.served_name, prompt="Person:", n=6, seed=2, temperature=1.0,
                                  max_tokens=120, extra_body=body)  # fmt: skip
    assert _validate_stopped([(c.text, c.finish_reason) for c in r.choices], SCHEMA) >= 4


def test_completions_regex_and_choice(client: openai.OpenAI, server: ServerHandle) -> None:
    regex = r"[A-Z][a-z]{1,5} [0-9]{2}"
    r = client.completions.create(model=server.served_name, prompt="Code:", n=4, seed=3, temperature=1.0,
                                  max_tokens=32, extra_body={"guided_regex": regex})  # fmt: skip
    for c in r.choices:
        assert c.finish_reason == "stop" and re.fullmatch(regex, c.text), (c.finish_reason, c.text)
    choices = ["left", "right", "up high"]
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        r = client.completions.create(model=server.served_name, prompt="Go", n=3, seed=4, temperature=1.0,
                                      max_tokens=16, extra_body=body)  # fmt: skip
        assert all(c.finish_reason == "stop" and c.text in choices for c in r.choices), [c.text for c in r.choices]


def _compact(text: str) -> bool:
    return text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    "flags",
    [["--structured-outputs-disable-any-whitespace"], ["--structured-outputs-config", '{"disable_any_whitespace": true}']],
    ids=["flag", "config-json"],
)
def test_server_wide_compact_json(launch_server: Any, flags: list[str]) -> None:
    handle = launch_server(flags)
    try:
        with openai.OpenAI(base_url=handle.url("/v1"), api_key="unused", max_retries=0, timeout=120) as c:
            r = c.completions.create(model=str(handle.model_path), prompt="JSON:", n=8, seed=5, temperature=1.0,
                                     max_tokens=60, extra_body={"guided_json": CLOSED_SCHEMA})  # fmt: skip
    finally:
        stop_server(handle.proc)
    done = [ch.text for ch in r.choices if ch.finish_reason == "stop"]
    assert len(done) >= 6, [ch.finish_reason for ch in r.choices]
    for text in done:
        jsonschema.validate(json.loads(text), CLOSED_SCHEMA)
        assert _compact(text), text


def test_bad_structured_outputs_config_is_refused_at_start(launch_server: Any) -> None:
    with pytest.raises(RuntimeError, match="unsupported key"):
        launch_server(["--structured-outputs-config", '{"disable_any_whitespace": true, "indent": 2}'])


@pytest.mark.parametrize(
    "body,param,fragment",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format", "type must be"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}}},
         "structured_outputs", "JSON schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regular expression"),
        ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"yaml": "a: 1"}}, "structured_outputs", "unsupported key"),
        ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "structured_outputs", "several"),
        ({"guided_choice": []}, "structured_outputs", "non-empty"),
    ],
)
def test_invalid_constraints_get_a_400_naming_the_field(
    http: httpx.Client, server: ServerHandle, body: dict[str, Any], param: str, fragment: str
) -> None:
    r = http.post("/v1/chat/completions", json={"model": server.served_name, "messages": MESSAGES, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    # and the server is fine afterwards
    ok = http.post("/v1/completions", json={"model": server.served_name, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
