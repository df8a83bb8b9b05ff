"""Structured outputs: a request's output constrained to a JSON schema, a regex, a choice or a grammar.

The grammar library is llguidance (vLLM's ``guidance`` backend): a ~3 MB wheel with no dependencies, chosen by
measurement over xgrammar (``benchmarks/grammar_backends.py``, figures in benchmarks/README.md).

* :class:`GrammarCompiler` builds the grammar of a :class:`~nanoserve.sampling_params.StructuredOutputsParams`
  once per spec (cached, thread-safe: the server compiles in a worker thread before the request reaches the
  engine loop, which then finds it cached) and copies one :class:`GrammarMatcher` per sequence from it.
* Each step the sampler asks the matchers of its constrained rows for their token bitmasks and sets every
  other token's logit to -inf (:func:`apply_token_bitmask`); the output processor advances each matcher with
  the token it accepted, and ends the sequence with ``"stop"`` once the grammar is complete.

A matcher's state is a function of the tokens accepted so far, which is why it survives preemption: a
preempted sequence is recomputed from its tokens, not re-sampled, so nothing is re-accepted. Each sample of an
``n > 1`` request has its own matcher; finished or aborted sequences simply drop theirs.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from nanoserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# vLLM's name for the llguidance backend (``--structured-outputs-config '{"backend": "guidance"}'``).
GRAMMAR_BACKEND = "guidance"
# Compiled grammars kept (each a few KB of grammar text; the matchers hold the compiled form).
GRAMMAR_CACHE_SIZE = 256


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError as exc:  # a broken install: the package is a hard dependency
        raise ValueError(f"structured outputs need the llguidance package ({exc}); pip install llguidance") from None
    return llguidance


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar built for this tokenizer: a matcher at its start, never advanced itself, that each sequence's
    matcher is copied from (a copy is cheap; building the grammar is what costs). ``kind`` names the field the
    grammar came from."""

    kind: str
    prototype: Any


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the matcher is then in error)."""
        return bool(self._matcher.consume_token(token))

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing more (EOS aside), or the matcher is in error."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens as bits into ``bitmask[row]`` (int32 words, bit i of word w = token
        32 w + i)."""
        v = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())


class GrammarCompiler:
    """Grammars for one tokenizer and model vocabulary (``vocab_size`` may exceed the tokenizer's length: the
    padding ids are never allowed)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        # llguidance's view of the tokenizer (build_ll_tokenizer), built on first use or by prepare()
        self._tokenizer: Any = None
        self._cache: OrderedDict[StructuredOutputsParams, CompiledGrammar] = OrderedDict()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = build_ll_tokenizer(self._hf_tokenizer, self.vocab_size, self._eos)
                except Exception as exc:  # a slow (non-fast) tokenizer, or one llguidance cannot read
                    raise ValueError(f"structured outputs are not available for this tokenizer: {exc}") from None
            return self._tokenizer

    def prepare(self) -> None:
        """Build llguidance's view of the tokenizer now (a server calls this at start-up, so the first
        constrained request does not wait for it)."""
        self._ll_tokenizer()

    def cached(self, spec: StructuredOutputsParams) -> bool:
        """Whether ``spec``'s grammar is already built (benchmarks use this to time a cold compile)."""
        with self._lock:
            return spec in self._cache

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The validated grammar of ``spec`` (cached); ValueError naming the field if it is invalid."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        tokenizer = self._ll_tokenizer()
        kind, grammar = _grammar_text(spec)
        # Building the matcher compiles the grammar (llguidance lets go of the GIL meanwhile); its own limits
        # bound the work a hostile grammar can cause, and report it as an error.
        prototype = _llguidance().LLMatcher(tokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise ValueError(f"structured_outputs.{kind}: invalid {_WHAT[kind]}: {prototype.get_error()}")
        compiled = CompiledGrammar(kind, prototype)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def matcher(compiled: CompiledGrammar) -> GrammarMatcher:
        """A new sequence's matcher, at the grammar's start."""
        return GrammarMatcher(compiled.prototype.deep_copy())


def build_ll_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> Any:
    """llguidance's view of a Hugging Face tokenizer, whose ids run up to ``vocab_size`` (the logits width).

    For byte-level BPE tokenizers (GPT-2's alphabet: Qwen, Llama 3, the test tokenizers) it is built from each
    id's bytes, which takes time linear in the vocabulary; ``llguidance.hf.from_tokenizer`` is quadratic in the
    number of added tokens (measured: 1.1 s against 212 s with 147k of them). Other tokenizers (SentencePiece's
    ``▁`` and ``<0x0A>`` pieces) go through ``from_tokenizer``, which knows their decoders."""
    ll = _llguidance()
    token_bytes = _byte_level_token_bytes(tokenizer, vocab_size)
    if token_bytes is None:
        return ll.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids or None)
    special = [i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i < vocab_size]
    view = _TokenBytes(tokenizer, token_bytes, eos_token_ids[0] if eos_token_ids else tokenizer.eos_token_id, special)
    return ll.LLTokenizer(ll.TokenizerWrapper(view), n_vocab=vocab_size, eos_token=eos_token_ids or None)


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable bytes stand for themselves, the other 68 map to
    chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _byte_level_token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes] | None:
    """Each id's bytes (b"" past the tokenizer's end), or None if the tokenizer is not byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    alphabet = _gpt2_byte_alphabet()
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    vocab = {i: piece for piece, i in backend.get_vocab(with_added_tokens=False).items()}
    token_bytes = []
    for i in range(vocab_size):
        if i in added:
            token_bytes.append(added[i].encode())
        elif i in vocab:
            piece = vocab[i]
            if any(c not in alphabet for c in piece):
                return None  # not GPT-2's alphabet after all
            token_bytes.append(bytes(alphabet[c] for c in piece))
        else:
            token_bytes.append(b"")  # padding rows of the embedding: never allowed
    return token_bytes


class _TokenBytes:
    """What ``llguidance.TokenizerWrapper`` reads: each id's bytes, the special ids, and an encoder."""

    def __init__(self, tokenizer: Any, tokens: list[bytes], eos_token_id: int, special: list[int]) -> None:
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.eos_token_id = eos_token_id
        self.bos_token_id = None
        self.special_token_ids = special

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


_WHAT = {"json": "JSON schema", "json_object": "JSON", "regex": "regular expression", "choice": "choice",
         "grammar": "grammar"}  # fmt: skip


def _grammar_text(spec: StructuredOutputsParams) -> tuple[str, str]:
    """(the field that set it, llguidance's grammar text)."""
    ll = _llguidance()
    options = {"whitespace_flexible": not spec.disable_any_whitespace}
    try:
        if spec.json is not None:
            return "json", ll.LLMatcher.grammar_from_json_schema(spec.json, defaults=options)
        if spec.json_object:
            return "json_object", ll.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=options)
        if spec.regex is not None:
            return "regex", ll.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            # Each choice a Lark string literal (JSON string escapes are Lark's).
            return "choice", ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
        # Lark, or llama.cpp's GBNF (llguidance converts it).
        return "grammar", ll.grammar_from("grammar", spec.grammar)
    except ValueError as exc:
        kind = next(k for k in ("json", "regex", "grammar") if getattr(spec, k) is not None)
        raise ValueError(f"structured_outputs.{kind}: {exc}") from None


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits[r, t]`` ([R, V], in place) to -inf wherever bit t of ``bitmask[r]`` ([R, ceil(V / 32)]
    int32) is 0."""
    rows, vocab = logits.shape
    shifts = _BIT_SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> shifts) & 1).view(rows, -1)[:, :vocab]
    logits.masked_fill_(allowed == 0, float("-inf"))
