"""How single tokens are shown in logprobs: their text, or ``bytes:\\xNN`` when they are not valid UTF-8 alone.

A byte-level BPE token can hold part of a multi-byte character. Decoding it alone gives U+FFFD, so distinct
tokens would look identical (and collide as keys of the legacy ``top_logprobs`` dicts). Like OpenAI's API we
show such tokens as ``bytes:\\xe2\\x80``, and report every token's exact bytes in chat logprobs.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # noqa: BLE001 - an unusual decoder: fall back to plain decoding
        return False
    return '"ByteLevel"' in json.dumps(state)


class TokenStrings:
    """Token id -> (display string, exact bytes), cached. Not thread-safe: one per event loop."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self(token_id)[0]

    def _lookup(self, token_id: int) -> tuple[str, bytes]:
        raw = self._raw_bytes(token_id)
        if raw is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return text, text.encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def _raw_bytes(self, token_id: int) -> bytes | None:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return None
        if token_id in getattr(self.tokenizer, "added_tokens_decoder", {}):
            return piece.encode()  # added tokens are stored as plain text
        m = _SENTENCEPIECE_BYTE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self._byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return None
