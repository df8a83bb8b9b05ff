"""Incremental detokenization and stop-string search for one sequence. Each step costs a few tokens' decode,
whatever the sequence's length: the text itself is kept by the output processor, never rebuilt here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Prompt tokens kept as left context so the first generated token decodes with the right spacing.
_CONTEXT_TOKENS = 5


@dataclass
class DetokenizerState:
    tokenizer: Any
    skip_special_tokens: bool
    ids: list[int] = field(default_factory=list)  # a little prompt context + generated tokens
    prefix_offset: int = 0
    read_offset: int = 0

    @classmethod
    def start(cls, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> DetokenizerState:
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        return cls(tokenizer, skip_special_tokens, context, 0, len(context))

    def append(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (may be empty while a UTF-8 character or a
        word piece is still incomplete)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""


def find_stop_string(text: str, delta_len: int, stops: tuple[str, ...]) -> tuple[str, int] | None:
    """The first stop string that appears in ``text`` overlapping its last ``delta_len`` characters,
    and where it starts."""
    best: tuple[str, int] | None = None
    for stop in stops:
        begin = max(0, len(text) - delta_len - len(stop) + 1)
        pos = text.find(stop, begin)
        if pos != -1 and (best is None or pos < best[1]):
            best = (stop, pos)
    return best
