"""Tool-call parsers (``--tool-call-parser hermes|llama3_json|mistral``): a model's reply text -> the content
and ``tool_calls`` of an OpenAI message, for ``tool_choice: "auto"``, where the model decides.

* ``hermes`` (Qwen2.5 / Qwen3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any
  number of them; text before the first is the content.
* ``llama3_json`` (Llama 3.1+): the whole reply is one or more JSON objects ``{"name": ..., "parameters":
  {...}}`` (``arguments`` accepted too), separated by ``;``, optionally after ``<|python_tag|>``.
* ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (v3 tokenizers) or
  ``name[ARGS]{...}`` per call (v11+); text before the marker is the content.

A reply that does not parse stays content, whole: a parser never raises on model text. ``start`` is where tool
calls begin, so a stream can send the text before it as content and hold the rest back until the reply ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (what OpenAI sends)
    id: str = ""

    @staticmethod
    def make(name: Any, arguments: Any) -> ToolCall | None:
        """From parsed JSON; None unless ``name`` is a string and ``arguments`` an object (or its JSON text)."""
        if not isinstance(name, str) or not name:
            return None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return None
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ParsedReply:
    content: str | None
    tool_calls: list[ToolCall]


def _whole(text: str) -> ParsedReply:
    return ParsedReply(text, [])


def _json_values(text: str, separator: str = "") -> list[Any] | None:
    """Every JSON value in ``text`` one after another (whitespace, and ``separator`` between them, allowed);
    None if anything else is there."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or (separator and text[i] == separator and values)):
            i += 1
        if i >= len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


class HermesParser:
    start = "<tool_call>"
    _call = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedReply:
        first = text.find(self.start)
        if first < 0:
            return _whole(text)
        calls = []
        for body in self._call.findall(text[first:]):
            values = _json_values(body)
            if not values or len(values) != 1 or not isinstance(values[0], dict):
                return _whole(text)
            call = ToolCall.make(values[0].get("name"), values[0].get("arguments"))
            if call is None:
                return _whole(text)
            calls.append(call)
        rest = self._call.sub("", text[first:]).strip()
        if rest:  # text after the calls that is not a call: not a clean tool-call reply
            return _whole(text)
        return ParsedReply(text[:first].strip() or None, calls)


class Llama3JsonParser:
    start = "{"
    python_tag = "<|python_tag|>"

    def parse(self, text: str) -> ParsedReply:
        body = text.strip()
        if body.startswith(self.python_tag):
            body = body[len(self.python_tag) :].strip()
        if not body.startswith("{"):
            return _whole(text)
        values = _json_values(body, separator=";")
        if not values or not all(isinstance(v, dict) for v in values):
            return _whole(text)
        calls = [ToolCall.make(v.get("name"), v.get("parameters", v.get("arguments"))) for v in values]
        if any(c is None for c in calls):
            return _whole(text)
        return ParsedReply(None, calls)  # type: ignore[arg-type]


class MistralParser:
    start = "[TOOL_CALLS]"
    _v11 = re.compile(r"\s*([A-Za-z0-9_.-]+)\[ARGS\]")

    def parse(self, text: str) -> ParsedReply:
        first = text.find(self.start)
        if first < 0:
            return _whole(text)
        content = text[:first].strip() or None
        body = text[first + len(self.start) :]
        calls: list[ToolCall | None] = []
        if body.lstrip().startswith("["):
            values = _json_values(body)
            if not values or len(values) != 1 or not isinstance(values[0], list):
                return _whole(text)
            calls = [ToolCall.make(v.get("name"), v.get("arguments")) if isinstance(v, dict) else None for v in values[0]]
        else:
            decoder, i = json.JSONDecoder(), 0
            while i < len(body) and body[i:].strip():
                if body.startswith(self.start, i):
                    i += len(self.start)
                m = self._v11.match(body, i)
                if not m:
                    return _whole(text)
                try:
                    args, i = decoder.raw_decode(body, m.end())
                except json.JSONDecodeError:
                    return _whole(text)
                calls.append(ToolCall.make(m.group(1), args))
        if not calls or any(c is None for c in calls):
            return _whole(text)
        return ParsedReply(content, calls)  # type: ignore[arg-type]


TOOL_PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}


def make_tool_parser(name: str) -> Any:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


def required_calls_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """``tool_choice: "required"``: the reply is constrained to a JSON list of one or more calls, each
    ``{"name": <a tool>, "parameters": <its arguments>}`` (vLLM's shape), which always parses."""
    options = []
    for tool in tools:
        fn = tool["function"]
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "parameters": fn.get("parameters") or {"type": "object"}},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })  # fmt: skip
    return {"type": "array", "minItems": 1, "items": {"anyOf": options}}


def parse_required(text: str) -> list[ToolCall] | None:
    """The calls of a reply made under :func:`required_calls_schema`; None if it did not finish."""
    values = _json_values(text)
    if not values or len(values) != 1 or not isinstance(values[0], list):
        return None
    calls = [ToolCall.make(v.get("name"), v.get("parameters")) if isinstance(v, dict) else None for v in values[0]]
    return None if not calls or any(c is None for c in calls) else calls  # type: ignore[return-value]


class ToolCallStream:
    """One streamed reply under ``tool_choice: "auto"``: text before the parser's ``start`` goes out as content
    as it comes (less a tail that may be the marker's beginning); from the marker on, text is held until the
    reply ends and then parsed. What :meth:`finish` returns completes exactly what :meth:`ParsedReply` of the
    whole text would say, given the content already sent."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self._sent = ""  # content already released
        self._held = ""
        self._calling = False
        # llama3_json calls are the whole reply: its first character decides, and a reply that does not open a
        # call is plain text to the end (a later "{" is just text)
        self._whole_reply = isinstance(parser, Llama3JsonParser)
        self._plain = False

    def feed(self, text: str) -> str:
        if self._calling:
            self._held += text
            return ""
        if self._plain:
            self._sent += text
            return text
        pending = self._held + text
        if self._whole_reply:
            stripped = pending.lstrip()
            if not stripped:
                self._held = pending
                return ""
            if stripped[0] == "{" or Llama3JsonParser.python_tag.startswith(stripped[: len(Llama3JsonParser.python_tag)]):
                self._calling = True
                self._held = pending
                return ""
            self._whole_reply = False
            self._plain = True
            self._held = ""
            self._sent += pending
            return pending
        marker = self.parser.start
        at = pending.find(marker)
        if at >= 0:
            self._calling = True
            self._held = pending[at:]
            out = pending[:at]
        else:
            keep = next((n for n in range(min(len(marker) - 1, len(pending)), 0, -1) if marker.startswith(pending[-n:])), 0)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._sent += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet sent, the tool calls)."""
        held, self._held = self._held, ""
        if not self._calling:
            return held, []
        parsed = self.parser.parse(self._sent + held)
        if not parsed.tool_calls:
            return held, []
        return "", parsed.tool_calls
