"""``--reasoning-parser``, ``chat_template_kwargs`` and ``--chat-template`` through a real server and the openai
client. A random-weight model writes no ``<think>`` of its own, so a regex constraint makes it write one:
the split is then known exactly."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import openai
import pytest

from tests.server.conftest import stop_server

MESSAGES = [{"role": "user", "content": "Think, then answer."}]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if mood is defined %}[mood:{{ mood }}]"
    "{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _client(handle: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=handle.url("/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize(
    "parser,regex,split",
    [
        ("deepseek_r1", r"[a-z]{2,8}</think>[a-z]{2,8}", r"([a-z]+)</think>([a-z]+)"),
        ("qwen3", r"<think>[a-z]{2,8}</think>[a-z]{2,8}", r"<think>([a-z]+)</think>([a-z]+)"),
    ],
)
def test_reasoning_split_whole_and_streamed(launch_server: Any, parser: str, regex: str, split: str) -> None:
    handle = launch_server(["--reasoning-parser", parser])
    try:
        with _client(handle) as c:
            body = {"guided_regex": regex}
            model = str(handle.model_path)
            r = c.chat.completions.create(model=model, messages=MESSAGES, n=3, seed=1, temperature=1.0,
                                          max_tokens=40, extra_body=body)  # fmt: skip
            for choice in r.choices:
                assert choice.finish_reason == "stop"
                msg = choice.message.model_dump()
                text = (msg.get("reasoning") or "") + "</think>" + (msg.get("content") or "")
                m = re.fullmatch(r"([a-z]+)</think>([a-z]+)", text)
                assert m and msg["reasoning"] == msg["reasoning_content"], msg
            stream = c.chat.completions.create(model=model, messages=MESSAGES, n=2, seed=2, temperature=1.0,
                                               max_tokens=40, stream=True, extra_body=body)  # fmt: skip
            reasoning, content = ["", ""], ["", ""]
            for chunk in stream:
                for ch in chunk.choices:
                    d = ch.delta.model_dump()
                    reasoning[ch.index] += d.get("reasoning") or ""
                    content[ch.index] += d.get("content") or ""
                    assert (d.get("reasoning") or None) == (d.get("reasoning_content") or None)
            for rs, ct in zip(reasoning, content):
                assert re.fullmatch(r"[a-z]{2,8}", rs) and re.fullmatch(r"[a-z]{2,8}", ct), (rs, ct)
    finally:
        stop_server(handle.proc)


def test_no_parser_leaves_the_reply_whole(client: openai.OpenAI, server: Any) -> None:
    r = client.chat.completions.create(model=server.served_name, messages=MESSAGES, seed=1, temperature=1.0,
                                       max_tokens=40, extra_body={"guided_regex": r"<think>[a-z]{2,4}</think>[a-z]{2}"})  # fmt: skip
    msg = r.choices[0].message.model_dump()
    assert re.fullmatch(r"<think>[a-z]{2,4}</think>[a-z]{2}", msg["content"]) and not msg.get("reasoning"), msg


def test_chat_template_file_and_its_kwargs(launch_server: Any, tmp_path: pathlib.Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    handle = launch_server(["--chat-template", str(template)])
    try:
        with _client(handle) as c:
            model = str(handle.model_path)
            plain = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
            moody = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2,
                                              extra_body={"chat_template_kwargs": {"mood": "sunny and warm"}})  # fmt: skip
            assert moody.usage.prompt_tokens > plain.usage.prompt_tokens  # "[mood:sunny and warm]" was rendered
            with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
                c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2,
                                          extra_body={"chat_template_kwargs": {"tokenize": True}})  # fmt: skip
    finally:
        stop_server(handle.proc)
