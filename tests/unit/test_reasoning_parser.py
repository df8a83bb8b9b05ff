"""The reasoning parsers on canned replies, whole and streamed in every possible pair of pieces (so a tag split
anywhere across deltas is handled), and character by character."""

from __future__ import annotations

import pytest

from nanoserve.server.reasoning import ReasoningParts, make_reasoning_parser

CASES = [
    # (parser, reply, reasoning, content)
    ("qwen3", "<think>\nLet me see.\n</think>\n\nThe answer is 4.", "\nLet me see.\n", "\n\nThe answer is 4."),
    ("qwen3", "The answer is 4.", "", "The answer is 4."),
    ("qwen3", "  <think>a</think>b", "a", "b"),
    ("qwen3", "<think>still thinking when cut off", "still thinking when cut off", ""),
    ("qwen3", "no open tag </think> stays content", "", "no open tag </think> stays content"),
    ("qwen3", "<thin", "", "<thin"),  # a prefix of the tag that never completes is text
    ("qwen3", "<think></think>", "", ""),
    ("qwen3", "x<think>y</think>", "", "x<think>y</think>"),  # only a leading tag opens reasoning
    ("deepseek_r1", "First, 2+2.</think>It is 4.", "First, 2+2.", "It is 4."),
    ("deepseek_r1", "<think>First.</think>4", "First.", "4"),
    ("deepseek_r1", "never closed", "never closed", ""),
    ("deepseek_r1", "a</thinkX>b</think>c", "a</thinkX>b", "c"),
    ("deepseek_r1", "", "", ""),
]


def _streamed(name: str, pieces: list[str]) -> ReasoningParts:
    p = make_reasoning_parser(name)
    parts = [p.feed(x) for x in pieces] + [p.finish()]
    return ReasoningParts("".join(x.reasoning for x in parts), "".join(x.content for x in parts))


@pytest.mark.parametrize("name,reply,reasoning,content", CASES)
def test_whole_and_streamed(name: str, reply: str, reasoning: str, content: str) -> None:
    want = ReasoningParts(reasoning, content)
    assert make_reasoning_parser(name).split(reply) == want
    assert _streamed(name, list(reply)) == want
    for cut in range(len(reply) + 1):
        for cut2 in range(cut, len(reply) + 1, 3):
            assert _streamed(name, [reply[:cut], reply[cut:cut2], reply[cut2:]]) == want, (cut, cut2)


def test_nothing_of_a_tag_leaks_while_it_is_incomplete() -> None:
    p = make_reasoning_parser("deepseek_r1")
    assert p.feed("abc</th") == ReasoningParts("abc", "")
    assert p.feed("ink>de") == ReasoningParts("", "de")


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="qwen3, deepseek_r1"):
        make_reasoning_parser("granite")
