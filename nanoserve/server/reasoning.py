"""Reasoning parsers (``--reasoning-parser qwen3|deepseek_r1``): a reply's ``<think>…</think>`` goes to the
message's reasoning field, the rest to its content, whole or delta by delta while streaming.

* ``qwen3``: reasoning only when the reply opens with ``<think>`` (Qwen3 writes it itself; with
  ``enable_thinking: false`` its template closes an empty think block in the prompt, and the reply is all
  content).
* ``deepseek_r1``: the template opens ``<think>`` in the prompt, so the reply starts in reasoning (a
  ``<think>`` it writes anyway is dropped) and a reply without ``</think>`` is all reasoning.

Streaming holds back at most the length of a tag, so a tag split across deltas is never shown as text; the
deltas of one reply add up to exactly what :meth:`ReasoningParser.split` gives for the whole of it.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParts:
    reasoning: str
    content: str


class ReasoningParser:
    """One reply's split; feed it the text in order (``feed``), then ``finish``."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._in_reasoning = starts_in_reasoning
        self._may_open = True  # before any text: a leading <think> may still come
        self._held = ""

    def feed(self, delta: str) -> ReasoningParts:
        text = self._held + delta
        self._held = ""
        reasoning, content = [], []
        while text:
            if self._may_open:
                stripped = text.lstrip()
                if THINK_START.startswith(stripped) and len(stripped) < len(THINK_START):
                    self._held = text  # could still become "<think>"
                    break
                self._may_open = False
                if stripped.startswith(THINK_START):
                    self._in_reasoning = True
                    text = stripped[len(THINK_START) :]
                    continue
            if not self._in_reasoning:
                content.append(text)
                break
            end = text.find(THINK_END)
            if end >= 0:
                reasoning.append(text[:end])
                self._in_reasoning = False
                text = text[end + len(THINK_END) :]
                continue
            keep = _partial_suffix(text, THINK_END)  # a "</thi" at the end may be the tag's beginning
            reasoning.append(text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        return ReasoningParts("".join(reasoning), "".join(content))

    def finish(self) -> ReasoningParts:
        held, self._held = self._held, ""
        if self._in_reasoning:
            return ReasoningParts(held, "")
        return ReasoningParts("", held)

    def split(self, text: str) -> ReasoningParts:
        a, b = self.feed(text), self.finish()
        return ReasoningParts(a.reasoning + b.reasoning, a.content + b.content)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


REASONING_PARSERS = {"qwen3": False, "deepseek_r1": True}  # name -> the reply starts in reasoning


def make_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}")
    return ReasoningParser(REASONING_PARSERS[name])
