"""Tool calling with the openai client: ``required`` and a named tool are enforced by constrained decoding, so
their calls always parse and validate; ``auto`` parses what the model writes (a regex constraint makes the
random-weight model write a hermes call); streamed calls reassemble; tools and the tool-call history reach the
chat template; bad tool settings are 400s."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jsonschema
import openai
import pytest

from tests.server.conftest import stop_server

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
# Renders the tools and the tool-call history, so the prompt shows that they reached it.
TEMPLATE = (
    "{% if tools %}[tools:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}]{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}(call {{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }})"
    "{% endfor %}{% if m.get('tool_call_id') %}(answers {{ m['tool_call_id'] }}){% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tool_server(launch_server: Any, tmp_path_factory: pytest.TempPathFactory):
    template = tmp_path_factory.mktemp("tools") / "template.jinja"
    template.write_text(TEMPLATE)
    handle = launch_server(["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--chat-template", str(template)])
    client = openai.OpenAI(base_url=handle.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    yield handle, client
    client.close()
    stop_server(handle.proc)


def _check_calls(message: Any) -> list[tuple[str, dict]]:
    got = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        got.append((call.function.name, args))
    return got


def test_required_always_parses(tool_server: Any) -> None:
    handle, client = tool_server
    # The list of calls may go on (no maxItems), so a random model needs room: 12 replies of up to 200 tokens.
    stopped = 0
    for seed in range(6):
        r = client.chat.completions.create(model=str(handle.model_path), messages=MESSAGES, tools=TOOLS,
                                           tool_choice="required", n=2, seed=seed, temperature=1.0, max_tokens=200,
                                           extra_body=COMPACT)  # fmt: skip
        for choice in r.choices:
            if choice.finish_reason == "tool_calls":
                stopped += 1
                assert choice.message.content is None and _check_calls(choice.message)
            else:
                assert choice.finish_reason == "length"
    assert stopped >= 6


def test_named_tool(tool_server: Any) -> None:
    handle, client = tool_server
    r = client.chat.completions.create(model=str(handle.model_path), messages=MESSAGES, tools=TOOLS, n=3, seed=1,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       temperature=1.0, max_tokens=40, extra_body=COMPACT)  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert [name for name, _ in _check_calls(choice.message)] == ["get_time"]


def test_auto_parses_what_the_model_writes_streamed_and_not(tool_server: Any) -> None:
    handle, client = tool_server
    regex = r'Checking\.<tool_call>\{"name":"get_weather","arguments":\{"city":"[a-z]{2,6}","unit":"(c|f)"\}\}</tool_call>'
    body = {"guided_regex": regex}
    r = client.chat.completions.create(model=str(handle.model_path), messages=MESSAGES, tools=TOOLS, seed=2,
                                       temperature=1.0, max_tokens=80, extra_body=body)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert [name for name, _ in _check_calls(choice.message)] == ["get_weather"]
    stream = client.chat.completions.create(model=str(handle.model_path), messages=MESSAGES, tools=TOOLS, seed=3,
                                            temperature=1.0, max_tokens=80, stream=True, extra_body=body)  # fmt: skip
    content, calls, finish = "", {}, None
    for chunk in stream:  # reassembled the way the openai client documents it
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and content == "Checking."
    (call,) = calls.values()
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)


def test_auto_plain_reply_stays_content(tool_server: Any) -> None:
    handle, client = tool_server
    r = client.chat.completions.create(model=str(handle.model_path), messages=MESSAGES, tools=TOOLS, seed=4,
                                       max_tokens=12, extra_body={"guided_regex": "[a-z ]{5,20}"})  # fmt: skip
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content


def test_tools_and_history_reach_the_template(tool_server: Any) -> None:
    handle, client = tool_server
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]  # fmt: skip
    plain = client.chat.completions.create(model=str(handle.model_path), messages=MESSAGES, max_tokens=1)
    with_tools = client.chat.completions.create(model=str(handle.model_path), messages=MESSAGES, tools=TOOLS,
                                                tool_choice="none", max_tokens=1)  # fmt: skip
    with_history = client.chat.completions.create(model=str(handle.model_path), messages=history, tools=TOOLS,
                                                  tool_choice="none", max_tokens=1)  # fmt: skip
    assert plain.usage.prompt_tokens < with_tools.usage.prompt_tokens < with_history.usage.prompt_tokens


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "no tool named"),
        (dict(tool_choice="required", response_format={"type": "json_object"}), "already constrains"),
    ],
)
def test_bad_tool_settings(tool_server: Any, kwargs: dict, fragment: str) -> None:
    handle, client = tool_server
    with pytest.raises(openai.BadRequestError, match=fragment):
        client.chat.completions.create(model=str(handle.model_path), messages=MESSAGES, tools=TOOLS, max_tokens=4, **kwargs)


def test_auto_needs_the_server_flag(client: openai.OpenAI, server: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
        client.chat.completions.create(model=server.served_name, messages=MESSAGES, tools=TOOLS, max_tokens=4)
    # "none" needs no parser
    r = client.chat.completions.create(model=server.served_name, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert r.choices[0].message.content is not None


def test_enable_auto_without_a_parser_is_refused(launch_server: Any, tmp_path: pathlib.Path) -> None:
    with pytest.raises(RuntimeError, match="needs --tool-call-parser"):
        launch_server(["--enable-auto-tool-choice"])
