"""Per-request sampling settings, shaped like vLLM's so users can switch engines without edits."""

from __future__ import annotations

import enum
import json as _json
import sys
from dataclasses import dataclass, field

# Upper bounds that keep one request from monopolising the engine; vLLM uses similar limits.
MAX_LOGPROBS = 20
MAX_N = 64
# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS): dividing logits by a temperature that small
# gives inf (NaN after softmax) once it underflows float32, and differs from argmax only on exact ties anyway.
SAMPLING_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What the engine hands back each step, as in vLLM: everything so far (``CUMULATIVE``), only what is new
    since the last output (``DELTA``: what a stream sends), or one output when the request ends
    (``FINAL_ONLY``: what ``LLM.generate`` and non-streaming requests use). The final output is the same
    either way for CUMULATIVE and FINAL_ONLY; DELTA outputs add up to it."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output to a grammar, as vLLM's ``StructuredOutputsParams``: exactly one of

    * ``json``: a JSON schema (a dict, or its JSON text) the output must satisfy;
    * ``json_object``: any JSON object;
    * ``regex``: a regular expression the whole output must match;
    * ``choice``: one of these strings, exactly;
    * ``grammar``: a context-free grammar in Lark syntax (llguidance's dialect; GBNF-style EBNF is not read).

    ``disable_any_whitespace``: JSON without free whitespace between tokens (compact output; random or small
    models otherwise pad JSON with whitespace for hundreds of tokens). The server's
    ``--structured-outputs-disable-any-whitespace`` sets it for every request. A constrained request ends
    with ``"stop"`` once the grammar is complete (and the model has emitted EOS where the grammar allows it), or
    ``"length"`` at ``max_tokens`` like any other.
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            which = ", ".join(given) if given else "none"
            raise ValueError(
                f"structured_outputs: give exactly one of json, json_object, regex, choice, grammar (got {which})"
            )
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json: must be a JSON schema (an object or its JSON text), got {type(self.json).__name__}")
        if isinstance(self.json, dict):
            # Kept as text, so the params hash (grammars are cached by them); key order is the schema's.
            try:
                object.__setattr__(self, "json", _json.dumps(self.json))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"structured_outputs.json: not serialisable as JSON ({exc})") from None
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name}: must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError(f"structured_outputs.choice: must be a non-empty list of strings, got {self.choice!r}")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice: every choice must be a non-empty string, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if not isinstance(self.disable_any_whitespace, bool) or not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object and .disable_any_whitespace must be booleans")


@dataclass
class SamplingParams:
    """How to turn logits into tokens for one request.

    ``temperature=0`` is greedy decoding, and so is any temperature below ``SAMPLING_EPS`` or ``top_k=1``.
    ``top_k`` beyond the vocabulary, like 0 or -1, keeps every token; ``top_p`` always keeps the most likely
    token. ``seed`` may be any integer. ``stop`` strings end the text *before* the stop string;
    ``stop_token_ids`` end generation after that token (the token stays in ``token_ids``, not in ``text``).
    Penalties follow the OpenAI/vLLM definitions: presence/frequency act on generated tokens only,
    repetition acts on prompt and generated tokens (positive logits divided, negative multiplied).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    # Log-probabilities of the prompt's own tokens (each given the ones before it) and the top-k at each
    # position: vLLM's prompt_logprobs. The first prompt token has none.
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    # Token id -> value added to its logit before sampling (OpenAI's logit_bias, each in [-100, 100]).
    logit_bias: dict[int, float] | None = None
    # Only these tokens may be sampled (vLLM's allowed_token_ids).
    allowed_token_ids: list[int] | None = None
    # Words never generated: the last token of each one's tokenization is banned wherever the tokens before it
    # have just been generated (vLLM's bad_words; with and without a leading space).
    bad_words: list[str] | None = None
    # Filled by the engine from the tokenizer; users normally leave it alone.
    _stop_strings: tuple[str, ...] = field(default=(), init=False, repr=False)
    _bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids else []
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        self._stop_strings = tuple(self.stop)

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name}: {why}")

        _check_int(self.n, "n")
        if not 1 <= self.n <= MAX_N:
            fail("n", f"must be between 1 and {MAX_N}, got {self.n}")
        _check_number(self.temperature, "temperature")
        if self.temperature < 0:
            fail("temperature", f"must be >= 0 (0 means greedy), got {self.temperature}")
        _check_number(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int(self.top_k, "top_k")
        if self.top_k < 0:
            fail("top_k", f"must be >= 1, or 0/-1 to disable, got {self.top_k}")
        _check_number(self.min_p, "min_p")
        if not 0 <= self.min_p <= 1:
            fail("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens")
            if self.max_tokens < 1:
                fail("max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check_int(self.min_tokens, "min_tokens")
        if self.min_tokens < 0:
            fail("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                fail("stop", f"must be a list of non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                fail("stop_token_ids", f"must be non-negative integers, got {t!r}")
        if self.seed is not None:
            _check_int(self.seed, "seed")
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                fail("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check_int(self.prompt_logprobs, "prompt_logprobs")
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                fail("prompt_logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(value, name)
            if not -2.0 <= value <= 2.0:
                fail(name, f"must be in [-2, 2], got {value}")
        _check_number(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", f"must be > 0 (1 disables it), got {self.repetition_penalty}")
        if not isinstance(self.output_kind, RequestOutputKind):
            fail("output_kind", f"must be a RequestOutputKind, got {self.output_kind!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail("logit_bias", f"must map token ids to numbers, got {type(self.logit_bias).__name__}")
            for token, bias in self.logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    fail("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
                _check_number(bias, "logit_bias")
                if not -100 <= bias <= 100:
                    fail("logit_bias", f"biases must be in [-100, 100], got {bias} for token {token}")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids:
                fail("allowed_token_ids", f"must be a non-empty list of token ids, got {ids!r}")
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    fail("allowed_token_ids", f"must be token ids (integers >= 0), got {t!r}")
            self.allowed_token_ids = list(ids)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
                fail("bad_words", f"must be a list of non-empty strings, got {self.bad_words!r}")
            self.bad_words = list(self.bad_words)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            fail("structured_outputs", f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        """Decoded by argmax (the first of equal maxima); the sampler's one test for it."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def restricts_tokens(self) -> bool:
        """Any of logit_bias, allowed_token_ids, bad_words: the sampler edits this row's logits."""
        return bool(self.logit_bias or self.allowed_token_ids or self._bad_words_token_ids)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _check_number(value: object, name: str) -> None:
    # inf passes the range checks (temperature >= 0, repetition_penalty > 0) but breaks the sampler's arithmetic
    # (-inf / inf is NaN), so every number must be finite. The comparison is False for NaN, and exact for an int
    # too large for a float (which math.isfinite would raise on).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
        raise ValueError(f"SamplingParams.{name}: must be a finite number, got {value!r}")


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"SamplingParams.{name}: must be an integer, got {value!r}")
