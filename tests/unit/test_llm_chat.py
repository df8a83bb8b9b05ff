"""``LLM.chat``: conversations through the chat template (the tokenizer's, or one given), with tools and
template keyword arguments reaching the template, and the same tokens as ``generate`` on the rendered text."""

from __future__ import annotations

import pathlib

import pytest

from nanoserve import LLM, SamplingParams
from nanoserve.testing.checkpoints import build_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# A template that shows what reached it: the tools' names and a keyword argument.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if tools %}[tools:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}]{% endif %}"
    "{% if mood is defined %}[mood:{{ mood }}]{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory):
    path: pathlib.Path = build_checkpoint(tmp_path_factory.mktemp("chat") / "m", arch="qwen3", seed=51)
    with LLM(str(path), kv_cache_memory="16MiB") as llm:
        yield llm


def test_chat_equals_generate_on_the_rendered_conversation(llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    got = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = llm.generate([{"prompt_token_ids": llm.get_tokenizer().encode(text, add_special_tokens=False)}], GREEDY, use_tqdm=False)[0]
    assert got.prompt == text and got.prompt_token_ids == want.prompt_token_ids
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_several_conversations_tools_and_template_kwargs(llm: LLM) -> None:
    conversations = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    outs = llm.chat(conversations, GREEDY, use_tqdm=False, tools=TOOLS, chat_template=TEMPLATE,
                    chat_template_kwargs={"mood": "sunny"})  # fmt: skip
    assert [o.prompt for o in outs] == [
        "<user>one[tools:get_weather;][mood:sunny]<assistant>",
        "<user>two[tools:get_weather;][mood:sunny]<assistant>",
    ]
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


def test_no_template_is_a_clear_error(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm.get_tokenizer(), "chat_template", None)
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
