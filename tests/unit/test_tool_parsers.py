"""The tool-call parsers on hand-written replies, well-formed and not (malformed text stays content and never
raises), and the stream splitter: streamed in any two pieces, content plus calls add up to the whole parse."""

from __future__ import annotations

import json

import pytest

from nanoserve.server.tool_parsers import ToolCallStream, make_tool_parser, parse_required, required_calls_schema

WEATHER = {"city": "Paris", "unit": "c"}

GOOD = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
     None, [("get_weather", WEATHER)]),
    ("hermes", 'Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", '
     '"arguments": {"x": 1}}</tool_call>', "Let me check.", [("a", {}), ("b", {"x": 1})]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}', None,
     [("get_weather", WEATHER)]),  # cut before the closing tag: the call is whole anyway
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "arguments": {}}; {"name": "b", "parameters": {"x": 1}}', None,
     [("a", {}), ("b", {"x": 1})]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]', None,
     [("get_weather", WEATHER)]),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}[TOOL_CALLS]b[ARGS]{"x": 1}', "Sure.",
     [("get_weather", WEATHER), ("b", {"x": 1})]),
]

MALFORMED = [
    ("hermes", "no calls here, just text"),
    ("hermes", "<tool_call>{not json}</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "a", "arguments": [1, 2]}</tool_call>'),  # arguments not an object
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call> and then more words'),
    ("llama3_json", "The weather is nice."),
    ("llama3_json", '{"name": "a", "parameters": {}} trailing'),
    ("llama3_json", '{"city": "Paris"}'),  # JSON, but not a call
    ("mistral", "[TOOL_CALLS] not a list"),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": "{broken"}]'),
    ("mistral", "[TOOL_CALLS]a[ARGS]{"),
]


@pytest.mark.parametrize("name,text,content,calls", GOOD)
def test_well_formed(name: str, text: str, content: str | None, calls: list) -> None:
    parsed = make_tool_parser(name).parse(text)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    assert all(c.id.startswith("call_") for c in parsed.tool_calls) and len({c.id for c in parsed.tool_calls}) == len(calls)


@pytest.mark.parametrize("name,text", MALFORMED)
def test_malformed_stays_content(name: str, text: str) -> None:
    parsed = make_tool_parser(name).parse(text)
    assert parsed.content == text and parsed.tool_calls == []


@pytest.mark.parametrize("name,text", [(n, t) for n, t, _, _ in GOOD] + MALFORMED)
def test_streamed_in_two_pieces_adds_up_to_the_whole(name: str, text: str) -> None:
    whole = make_tool_parser(name).parse(text)
    for cut in range(len(text) + 1):
        stream = ToolCallStream(make_tool_parser(name))
        sent = stream.feed(text[:cut]) + stream.feed(text[cut:])
        rest, calls = stream.finish()
        sent += rest
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls], cut
        if whole.tool_calls:
            assert sent.strip() == (whole.content or ""), (cut, sent)
        else:
            assert sent == text, (cut, sent)


def test_required_schema_round_trip() -> None:
    tools = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
             {"type": "function", "function": {"name": "b"}}]  # fmt: skip
    schema = required_calls_schema(tools)
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    calls = parse_required('[{"name": "a", "parameters": {"x": 3}}, {"name": "b", "parameters": {}}]')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 3}), ("b", {})]
    assert parse_required('[{"name": "a", "parameters": {"x": 3}}') is None  # cut off
    assert parse_required("[]") is None


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        make_tool_parser("pythonic")
