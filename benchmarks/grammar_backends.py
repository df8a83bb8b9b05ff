"""Grammar backends for structured outputs, side by side: xgrammar and llguidance on one tokenizer.

For each backend importable in this interpreter (``--backends`` picks among them):

* tokenizer info: building it from the Hugging Face tokenizer (once per tokenizer) and the RSS it adds;
* compile: five JSON schemas (nested objects, arrays with minItems/maxItems, enums, bounded numbers, string
  patterns, maxLength, $ref/anyOf), each also compact (no free whitespace), any JSON object, a regex, a choice
  and a Lark grammar. Cold compile (median of ``--repeats``), the first mask after it, and what a second
  request with the same grammar costs (xgrammar: a compile-cache hit; llguidance has no cache: a new matcher);
* one decode step for ``--batch`` requests with the same grammar, each teacher-forced to a different point of
  a valid output (so every row is a real mid-generation state, and every forced token is checked to be in
  its mask): filling the int32 bitmask (the batch API on ``--threads`` threads, and row by row), applying it to
  [batch, vocab] float32 logits (the library's CPU kernel and two library-free torch / numpy versions), and
  accepting a token;
* smoke: ``--samples`` random outputs per grammar, drawn among the allowed tokens until the matcher takes a
  stop token, decoded and checked (json.loads + jsonschema, no whitespace outside strings when compact,
  re.fullmatch, choice membership, a small checker for the Lark grammar);
* strictness: whether a JSON string (plain, with maxLength / minLength, with a pattern) lets a raw control
  character through (JSON forbids them unescaped);
* state: rollback of k tokens, rollback past the stop token, fork (deep copy), restoring a preempted
  request by re-accepting its output tokens into a new matcher, and whether compile lets go of the GIL.

Neither library is a nanoserve dependency; run this with a scratch venv that has torch, transformers,
jsonschema and the backend(s):

    python3 -m venv /tmp/g && /tmp/g/bin/pip install torch==2.13.0 transformers jsonschema xgrammar llguidance
    /tmp/g/bin/python benchmarks/grammar_backends.py                            # both, side by side
    XGR_VENV/bin/python benchmarks/grammar_backends.py --json /tmp/xgr.json     # or one venv per backend,
    LLG_VENV/bin/python benchmarks/grammar_backends.py --json /tmp/llg.json
    python3 benchmarks/grammar_backends.py --merge /tmp/xgr.json /tmp/llg.json   # then one table with ratios

``--tokenizer DIR`` takes any directory AutoTokenizer loads (default: the Qwen3-0.6B bench shape's); the model's
vocab size (the logits width, which may exceed the tokenizer's length) comes from its config.json or
``--vocab-size``, the stop tokens from generation_config.json. The bench shape's tokenizer has 147,380 added
tokens (``<|extra_N|>``, not special), for which ``llguidance.hf.from_tokenizer`` takes minutes (it is quadratic
in added tokens); ``--llg-tokenizer bytes`` builds llguidance's tokenizer from the token bytes instead, which
also makes those tokens text, as xgrammar has them. Nothing asserts a speed; a failed smoke or state
check is printed and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TOKENIZER = Path.home() / ".cache/nanoserve/bench/qwen3-0.6b-5ebb6591"
pc = time.perf_counter


# ---------------------------------------------------------------------------------------------------- grammars


def _no_ws_outside_strings(text: str) -> bool:
    return not re.search(r"\s", re.sub(r'"(?:\\.|[^"\\])*"', "", text))


_NUM = r"(?:[1-9][0-9]{0,5}|0)"
_FLAT_ARITH = re.compile(rf"{_NUM}(?:[-+*/]{_NUM})*")


def _arith_ok(text: str) -> bool:
    """The Lark grammar below, checked by collapsing innermost parentheses."""
    while inner := re.search(r"\(([^()]*)\)", text):
        if not _FLAT_ARITH.fullmatch(inner.group(1)):
            return False
        text = text[: inner.start()] + "0" + text[inner.end() :]
    return _FLAT_ARITH.fullmatch(text) is not None


@dataclass
class Grammar:
    """One constraint as a request would give it (vLLM's StructuredOutputsParams fields), with a valid output
    to teacher-force and a checker for generated text."""

    name: str
    kind: str  # json | json_object | regex | choice | lark
    spec: Any
    example: Any  # a valid output: a JSON value (for json kinds) or the text itself
    compact: bool = False

    def example_text(self) -> str:
        if self.kind in ("json", "json_object"):
            seps = (",", ":") if self.compact else (", ", ": ")
            return json.dumps(self.example, separators=seps)
        return self.example

    def check(self, text: str) -> str | None:
        """None when ``text`` satisfies the constraint, else why not."""
        if self.kind in ("json", "json_object"):
            try:
                value = json.loads(text)
            except ValueError as exc:
                return f"not JSON ({exc})"
            if self.kind == "json_object" and not isinstance(value, dict):
                return "not an object"
            if self.kind == "json":
                import jsonschema

                errors = list(jsonschema.Draft202012Validator(self.spec).iter_errors(value))
                if errors:
                    return f"schema: {errors[0].message}"
            if self.compact and not _no_ws_outside_strings(text):
                return "whitespace outside strings"
            return None
        if self.kind == "regex":
            return None if re.fullmatch(self.spec, text) else "regex does not match"
        if self.kind == "choice":
            return None if text in self.spec else "not one of the choices"
        if self.kind == "lark":
            return None if _arith_ok(text) else "not in the grammar"
        raise ValueError(self.kind)


def _obj(props: dict[str, Any], required: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    # additionalProperties false everywhere: xgrammar's strict_mode (its default) assumes it, llguidance
    # follows the schema (extra keys allowed unless forbidden), so this keeps both on the same language.
    return {"type": "object", "properties": props, "required": list(props if required is None else required),
            "additionalProperties": False, **extra}  # fmt: skip


SCHEMAS: list[tuple[str, dict[str, Any], Any]] = [
    (
        "flat",
        _obj({"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
              "active": {"type": "boolean"}}),  # fmt: skip
        {"name": "Ada Lovelace", "age": 36, "active": True},
    ),
    (
        "enum_bounds",
        _obj({
            "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
            "price": {"type": "number", "minimum": 0, "exclusiveMaximum": 10000},
            "discount": {"type": "number", "minimum": 0, "maximum": 1},
            "currency": {"const": "EUR"},
        }),
        {"status": "shipped", "priority": 2, "price": 129.95, "discount": 0.15, "currency": "EUR"},
    ),
    (
        "arrays",
        _obj({
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 5},
            "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 4},
            "matrix": {"type": "array", "minItems": 2, "maxItems": 2,
                       "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}},
        }),  # fmt: skip
        {"tags": ["red", "fast", "cheap"], "scores": [0.5, 0.25, 1], "matrix": [[1, 2, 3], [4, 5]]},
    ),
    (
        "patterns",
        _obj({
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3,5}$"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "email": {"type": "string", "pattern": "^[a-z0-9._]{1,20}@[a-z0-9]{1,12}\\.(com|org|net)$"},
            "note": {"type": "string", "minLength": 3, "maxLength": 40},
        }),
        {"sku": "ABC-1234", "date": "2026-12-01", "email": "ada.l@example.org", "note": "fragile, keep dry"},
    ),
    (
        "nested",
        {
            "$defs": {
                "address": _obj({"street": {"type": "string", "maxLength": 40}, "city": {"type": "string"},
                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),  # fmt: skip
                "item": _obj({
                    "id": {"type": "integer", "minimum": 1},
                    "kind": {"enum": ["book", "pen", "lamp"]},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "gift": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
                }, required=["id", "kind", "qty"]),
            },
            **_obj(
                {
                    "customer": _obj({"name": {"type": "string", "maxLength": 30},
                                      "email": {"type": "string", "maxLength": 40},
                                      "address": {"$ref": "#/$defs/address"}}),  # fmt: skip
                    "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 4},
                    "express": {"type": "boolean"},
                    "comment": {"anyOf": [{"type": "string", "maxLength": 60}, {"type": "null"}]},
                },
                required=["customer", "items", "express"],
            ),
        },
        {
            "customer": {"name": "Grace Hopper", "email": "grace@navy.mil",
                         "address": {"street": "1 Main St", "city": "Arlington", "zip": "22201"}},  # fmt: skip
            "items": [{"id": 7, "kind": "book", "qty": 2, "gift": "for Ada"}, {"id": 12, "kind": "lamp", "qty": 1}],
            "express": False,
            "comment": None,
        },
    ),
]

CHOICES = ["positive", "negative", "neutral", "mixed (see notes)", 'she said "no"']
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,5}|0/
"""


def all_grammars() -> list[Grammar]:
    out = []
    for compact in (False, True):
        suffix = "/compact" if compact else ""
        for name, schema, example in SCHEMAS:
            out.append(Grammar(f"json:{name}{suffix}", "json", schema, example, compact))
        out.append(Grammar(f"json_object{suffix}", "json_object", {"type": "object"},
                           {"id": 3, "tags": ["a", "b"], "meta": {"ok": True, "x": None}}, compact))  # fmt: skip
    out.append(Grammar("regex:email", "regex", r"[a-z][a-z0-9._]{0,15}@[a-z0-9]{1,10}\.(com|org|net)",
                       "jane.doe_42@example.org"))  # fmt: skip
    out.append(Grammar("choice", "choice", CHOICES, "mixed (see notes)"))
    out.append(Grammar("lark:arith", "lark", LARK, "12*(3+45)-6/(7+(8*9))"))
    return out


# ---------------------------------------------------------------------------------------------------- backends
# One adapter per library, each the exact calls a nanoserve integration would make. The bitmask is the same
# in both: int32 [rows, ceil(vocab / 32)], bit j of word w (LSB first) set when token 32 * w + j is allowed.


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, hf_tokenizer: Any, vocab: Vocab, threads: int, args: argparse.Namespace) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.version = xgr.__version__ if hasattr(xgr, "__version__") else _dist_version("xgrammar")
        t0 = pc()
        # vocab_size: the model's logits width; ids past the tokenizer's length are never allowed.
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab.size, stop_token_ids=vocab.stop_ids)
        self.tokenizer_info_s, self.tokenizer_build = pc() - t0, "TokenizerInfo.from_huggingface"
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=True)
        self.single_thread_compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.batchers: dict[int, Any] = {}

    def compile(self, g: Grammar, *, cold: bool = True, compiler: Any = None) -> Any:
        c = compiler or self.compiler
        if cold and c is self.compiler:
            c.clear_cache()
        if g.kind in ("json", "json_object"):
            # compact: any_whitespace=False alone gives ", " and ": "; separators make it llguidance's ",", ":".
            ws = {"any_whitespace": False, "separators": (",", ":")} if g.compact else {"any_whitespace": True}
            return c.compile_json_schema(json.dumps(g.spec), **ws)
        if g.kind == "regex":
            return c.compile_regex(g.spec)
        if g.kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in g.spec))
        if g.kind == "lark":
            return c.compile_lark(g.spec)
        raise ValueError(g.kind)

    def compile_work(self, g: Grammar) -> Callable[[], object]:
        return lambda: self.compile(g, compiler=self.single_thread_compiler)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def accept(self, m: Any, token: int) -> bool:
        return m.accept_token(token)  # False leaves the state unchanged

    def fill_batch(self, matchers: list[Any], bitmask: Any, threads: int) -> None:
        if threads not in self.batchers:
            self.batchers[threads] = self.xgr.BatchGrammarMatcher(max_threads=threads)
        self.batchers[threads].batch_fill_next_token_bitmask(matchers, bitmask)

    def fill_row(self, m: Any, bitmask: Any, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)  # its C++ CPU kernel for CPU tensors

    def finished(self, m: Any) -> bool:
        return m.is_terminated()  # True once a stop token has been accepted

    def rollback(self, m: Any, k: int) -> None:
        m.rollback(k)

    def fork(self, m: Any) -> Any:
        return m.fork()

    def compiled_bytes(self, compiled: Any) -> int | None:
        return compiled.memory_size_bytes


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, hf_tokenizer: Any, vocab: Vocab, threads: int, args: argparse.Namespace) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llgt = llguidance.torch
        self.version = llguidance.__version__
        t0 = pc()
        if args.llg_tokenizer == "hf":
            # n_vocab: the model's logits width. Every added token counts as special (never matched as text).
            self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab.size, eos_token=vocab.stop_ids)
            self.tokenizer_build = "hf.from_tokenizer"
        else:
            # From the token bytes: linear in the vocabulary, where from_tokenizer is quadratic in the number of
            # added tokens (minutes for 100k+). Added tokens not marked special are text, as in xgrammar.
            self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer(hf_tokenizer, vocab)),
                                                    n_vocab=vocab.size, eos_token=vocab.stop_ids)  # fmt: skip
            self.tokenizer_build = "LLTokenizer(TokenizerWrapper)"
        self.tokenizer_info_s = pc() - t0
        self.executors: dict[int, Any] = {}

    def grammar_text(self, g: Grammar) -> str:
        M = self.llg.LLMatcher
        if g.kind in ("json", "json_object"):
            # whitespace_flexible False: no free whitespace, separators "," and ":".
            return M.grammar_from_json_schema(json.dumps(g.spec), defaults={"whitespace_flexible": not g.compact})
        if g.kind == "regex":
            return M.grammar_from_regex(g.spec)
        if g.kind == "choice":
            return self.llg.grammar_from("choice", json.dumps(g.spec))
        if g.kind == "lark":
            return M.grammar_from_lark(g.spec)
        raise ValueError(g.kind)

    def compile(self, g: Grammar, *, cold: bool = True) -> str:
        # No compile step or cache: the grammar is built when a matcher is made (its lexer states lazily, per
        # matcher). Making one is what validates it (cold); the "compiled" form is the grammar text, which an
        # engine would keep by key after that (not cold: no second validation).
        text = self.grammar_text(g)
        if cold:
            m = self.llg.LLMatcher(self.tokenizer, text, log_level=0)
            if m.is_error():
                raise RuntimeError(m.get_error())
        return text

    def compile_work(self, g: Grammar) -> Callable[[], object]:
        return lambda: self.compile(g)

    def matcher(self, compiled: str) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)

    def accept(self, m: Any, token: int) -> bool:
        return m.consume_token(token)  # False puts the matcher in a permanent error state

    def fill_batch(self, matchers: list[Any], bitmask: Any, threads: int) -> None:
        if threads not in self.executors:
            self.executors[threads] = self.llg.LLExecutor(num_threads=threads)
        self.llgt.fill_next_token_bitmask_par(self.executors[threads], [(m, i) for i, m in enumerate(matchers)], bitmask)

    def fill_row(self, m: Any, bitmask: Any, row: int) -> None:
        self.llgt.fill_next_token_bitmask(m, bitmask, row)

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.llgt.apply_token_bitmask_inplace(logits, bitmask)  # torch.compile'd (inductor, C++ on CPU)

    def finished(self, m: Any) -> bool:
        return m.is_stopped()  # also True when nothing but a stop token may follow

    def rollback(self, m: Any, k: int) -> None:
        if not m.rollback(k):
            raise RuntimeError(m.get_error() or "rollback refused")

    def fork(self, m: Any) -> Any:
        return m.deep_copy()

    def compiled_bytes(self, compiled: Any) -> int | None:
        return None


class _ByteTokenizer:
    """What llguidance.TokenizerWrapper reads: each id's bytes, the special ids, and an encoder."""

    def __init__(self, hf: Any, vocab: Vocab) -> None:
        self.hf = hf
        self.tokens = vocab.token_bytes
        self.eos_token_id = vocab.stop_ids[0]
        self.bos_token_id = None
        self.special_token_ids = [i for i, t in hf.added_tokens_decoder.items() if t.special]

    def __call__(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)


BACKENDS: dict[str, type] = {"xgrammar": XGrammarBackend, "llguidance": LLGuidanceBackend}


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# ---------------------------------------------------------------------------------------------------- helpers


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _allowed(bitmask_row: Any, vocab_size: int) -> Any:
    """Allowed token ids of one int32 bitmask row (little-endian host: byte order = token order)."""
    import numpy as np

    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def _bit(bitmask: Any, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token >> 5]) >> (token & 31)) & 1)


def apply_bitmask_torch(logits: Any, bitmask: Any) -> None:
    """Library-free reference: logits [B, V] float, bitmask [B, ceil(V/32)] int32; -inf where the bit is 0."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, : logits.shape[1]]
    logits.masked_fill_(allowed == 0, float("-inf"))


def apply_bitmask_numpy(logits: Any, bitmask: Any) -> None:
    """The same through numpy's unpackbits (one byte-wide pass instead of 32 shifts)."""
    import numpy as np
    import torch

    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
    logits.masked_fill_(torch.from_numpy(allowed) == 0, float("-inf"))


def _gil_stall(work: Callable[[], object], seconds: float) -> dict[str, float]:
    """While ``work`` runs for about ``seconds`` in another thread, the longest the main thread waited past a
    1 ms sleep (that is, for the GIL), beside the length of one call: a library that holds the GIL stalls the
    main thread (an engine's event loop) for about a whole call, one that releases it for well under it."""
    t0 = pc()
    work()
    one = pc() - t0
    rounds = max(1, round(seconds / max(one, 1e-6)))
    th = threading.Thread(target=lambda: [work() for _ in range(rounds)])
    th.start()
    worst = 0.0
    while th.is_alive():
        t0 = pc()
        time.sleep(0.001)
        worst = max(worst, pc() - t0 - 0.001)
    return {"call_ms": one * 1e3, "max_stall_ms": worst * 1e3}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in keep)
    return {b: chr(b) if b in keep else chr(256 + n) for n, b in enumerate(extra)} | {b: chr(b) for b in keep}


@dataclass
class Vocab:
    """What the benchmark itself needs of the tokenizer: each id's bytes, the 'closer' tokens that the smoke
    sampler favours so random outputs end (strings, arrays, objects, parentheses), and the whitespace-only
    tokens it draws less often (a real vocabulary has hundreds, which would otherwise pad JSON forever)."""

    hf: Any
    size: int  # the model's logits width
    stop_ids: list[int]
    token_bytes: list[bytes] = field(default_factory=list)
    closers: Any = None  # bool [size]
    whitespace: Any = None  # bool [size]

    def __post_init__(self) -> None:
        import numpy as np

        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        added = {i: t.content for i, t in self.hf.added_tokens_decoder.items()}
        for i, piece in enumerate(self.hf.convert_ids_to_tokens(list(range(len(self.hf))))):
            if i in added:
                self.token_bytes.append(added[i].encode())
            elif piece is None:
                self.token_bytes.append(b"")
            elif any(c not in byte_of for c in piece):
                self.token_bytes.append(self.hf.decode([i]).encode())
            else:
                self.token_bytes.append(bytes(byte_of[c] for c in piece))
        self.token_bytes += [b""] * (self.size - len(self.token_bytes))
        closer_set, space_set = set(b'"}],:)'), set(b" \t\n\r")
        self.closers = np.array([bool(b) and set(b) <= closer_set for b in self.token_bytes])
        self.closers[self.stop_ids] = True
        self.whitespace = np.array([bool(b) and set(b) <= space_set for b in self.token_bytes])

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8")  # strict: invalid UTF-8 is a failure


# ---------------------------------------------------------------------------------------------------- measures


def measure_compile(be: Any, g: Grammar, words: int, repeats: int) -> dict[str, Any]:
    import torch

    cold = []
    for _ in range(repeats):
        gc.collect()
        t0 = pc()
        compiled = be.compile(g, cold=True)
        cold.append(pc() - t0)
    t0 = pc()
    m = be.matcher(compiled)
    t_matcher = pc() - t0
    bitmask = torch.empty((1, words), dtype=torch.int32)
    t0 = pc()
    be.fill_row(m, bitmask, 0)
    t_first = pc() - t0
    t0 = pc()
    again = be.compile(g, cold=False)  # a second request with the same grammar (xgrammar: cache hit)
    t_again = pc() - t0
    m2 = be.matcher(again)
    t0 = pc()
    be.fork(m2)
    t_fork = pc() - t0
    size = be.compiled_bytes(compiled)
    return {
        "compile_ms": statistics.median(cold) * 1e3,
        "new_matcher_ms": t_matcher * 1e3,
        "first_mask_ms": t_first * 1e3,
        "second_request_ms": (t_again + t_matcher) * 1e3,
        "fork_fresh_ms": t_fork * 1e3,
        "compiled_mib": None if size is None else size / 2**20,
        "compiled": compiled,
    }


def measure_steps(be: Any, compiled: Any, seq: list[int], batch: int, steps: int, words: int,
                  threads: int) -> dict[str, Any]:  # fmt: skip
    """``steps`` decode steps of ``batch`` requests of one grammar, row r starting r/batch of the way through
    ``seq`` (a valid output + a stop token); a row whose output ended is replaced by a new request. Masks are
    filled row by row (``threads`` 0) or by the batch API on ``threads`` threads."""
    import torch

    L = len(seq)
    matchers = [be.matcher(compiled) for _ in range(batch)]
    pos = [r * L // batch for r in range(batch)]
    accept_s: list[float] = []
    errors: list[str] = []

    def accept(r: int) -> None:
        t0 = pc()
        ok = be.accept(matchers[r], seq[pos[r]])
        accept_s.append(pc() - t0)
        if not ok:
            errors.append(f"row {r}: token {pos[r]} of the valid output refused")
        pos[r] += 1

    for r in range(batch):
        target = pos[r]
        pos[r] = 0
        while pos[r] < target:
            accept(r)
    bitmask = torch.full((batch, words), -1, dtype=torch.int32)
    fill_s, allowed_step0 = [], 0
    for step in range(steps):
        for r in range(batch):
            if pos[r] == L:
                matchers[r], pos[r] = be.matcher(compiled), 0
        t0 = pc()
        if threads == 0:
            for r, m in enumerate(matchers):
                be.fill_row(m, bitmask, r)
        else:
            be.fill_batch(matchers, bitmask, threads)
        fill_s.append(pc() - t0)
        if step == 0:
            import numpy as np

            allowed_step0 = int(np.unpackbits(bitmask.numpy().view(np.uint8)).sum())
        for r in range(batch):
            if not _bit(bitmask, r, seq[pos[r]]):
                errors.append(f"row {r}: token {pos[r]} of the valid output not in its mask")
            accept(r)
    return {
        "fill_ms_per_step": statistics.mean(fill_s) * 1e3,
        "fill_ms_per_step_max": max(fill_s) * 1e3,
        "fill_us_per_row": statistics.mean(fill_s) / batch * 1e6,
        "accept_us_per_token": statistics.mean(accept_s) * 1e6,
        "allowed_tokens_step0": allowed_step0,
        "errors": errors[:3],
        "last_bitmask": bitmask,
    }


def measure_apply(apply_fns: dict[str, Callable[[Any, Any], None]], bitmask: Any, vocab_size: int,
                  rounds: int = 30) -> dict[str, Any]:  # fmt: skip
    """Each way of applying ``bitmask`` to [rows, vocab_size] float32 logits, checked against the reference and
    timed in interleaved rounds (so drifting machine noise falls on all of them alike); median ms."""
    import torch

    torch.manual_seed(0)
    logits = torch.randn(bitmask.shape[0], vocab_size)
    ref = logits.clone()
    apply_bitmask_torch(ref, bitmask)
    out: dict[str, Any] = {}
    work = logits.clone()
    fns = {}
    for name, fn in apply_fns.items():
        work.copy_(logits)
        t0 = pc()
        try:
            fn(work, bitmask)  # first call: torch.compile's compile for llguidance's kernel
        except Exception as exc:  # noqa: BLE001 - e.g. inductor without a C++ compiler
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        out[name] = {"first_ms": (pc() - t0) * 1e3, "same_as_reference": torch.equal(work, ref), "times": []}
        fns[name] = fn
    for _ in range(rounds):
        for name, fn in fns.items():
            work.copy_(logits)
            t0 = pc()
            fn(work, bitmask)
            out[name]["times"].append(pc() - t0)
    for name in fns:
        out[name]["ms"] = statistics.median(out[name].pop("times")) * 1e3
    return out


def smoke(be: Any, compiled: Any, g: Grammar, vocab: Vocab, samples: int, max_tokens: int,
          seed: int) -> dict[str, Any]:  # fmt: skip
    """Random outputs: each step picks uniformly among the allowed tokens (20%), the allowed tokens that are not
    only whitespace (40%) or the allowed 'closer' and stop tokens (40%), until a stop token is accepted or
    ``max_tokens``."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    bitmask = torch.empty((1, (vocab.size + 31) // 32), dtype=torch.int32)
    stops = set(vocab.stop_ids)
    result: dict[str, Any] = {"valid": 0, "invalid": 0, "unterminated": 0, "tokens": 0, "failures": [], "example": None}
    for _ in range(samples):
        m, out, stopped = be.matcher(compiled), [], False
        for _ in range(max_tokens):
            be.fill_row(m, bitmask, 0)
            allowed = _allowed(bitmask[0], vocab.size)
            if not len(allowed):
                result["failures"].append("empty mask")
                break
            if allowed[-1] >= len(vocab.hf):  # the model's padding rows past the tokenizer: never to be sampled
                result["failures"].append(f"padding id {int(allowed[-1])} allowed")
                break
            u = rng.random()
            pool = allowed[vocab.closers[allowed]] if u < 0.4 else allowed[~vocab.whitespace[allowed]] if u < 0.8 else allowed
            pool = pool if len(pool) else allowed
            token = int(pool[rng.integers(len(pool))])
            if not be.accept(m, token):
                result["failures"].append(f"allowed token {token} refused")
                break
            if token in stops:
                stopped = True
                break
            out.append(token)
        result["tokens"] += len(out)
        if not stopped:
            result["unterminated"] += 1
            continue
        if not be.finished(m):
            result["failures"].append("stop token accepted but matcher not finished")
        try:
            text = vocab.decode(out)
            why = g.check(text)
        except UnicodeDecodeError:
            text, why = repr(b"".join(vocab.token_bytes[i] for i in out)), "invalid UTF-8"
        if why is None:
            result["valid"] += 1
            result["example"] = result["example"] or text
        else:
            result["invalid"] += 1
            result["failures"].append(f"{why}: {text[:120]!r}")
    result["failures"] = result["failures"][:3]
    return result


def state_checks(be: Any, compiled: Any, seq: list[int], words: int) -> dict[str, Any]:
    """Rollback, rollback past the stop token, fork, and restore-by-re-accepting on one valid output."""
    import torch

    def mask(m: Any) -> Any:
        b = torch.empty((1, words), dtype=torch.int32)
        be.fill_row(m, b, 0)
        return b

    def feed(m: Any, tokens: Sequence[int]) -> None:
        for t in tokens:
            if not be.accept(m, t):
                raise RuntimeError("valid token refused")

    n = len(seq) - 1  # seq ends with a stop token
    k = n // 2
    out: dict[str, Any] = {}
    m = be.matcher(compiled)
    at0 = mask(m)
    feed(m, seq[:k])
    at_k = mask(m)
    feed(m, seq[k:n])
    at_n = mask(m)
    t0 = pc()
    be.rollback(m, n - k)
    out["rollback_us"] = (pc() - t0) * 1e6
    out["rollback_ok"] = torch.equal(mask(m), at_k)
    t0 = pc()
    f = be.fork(m)
    out["fork_us"] = (pc() - t0) * 1e6
    feed(f, seq[k:n])
    out["fork_ok"] = torch.equal(mask(m), at_k) and torch.equal(mask(f), at_n)
    r = be.matcher(compiled)
    t0 = pc()
    feed(r, seq[:k])  # a preempted request's matcher, rebuilt from its output tokens
    out["restore_us_per_token"] = (pc() - t0) / max(k, 1) * 1e6
    out["restore_ok"] = torch.equal(mask(r), at_k)
    feed(m, seq[k:])  # through the stop token
    finished = be.finished(m)
    try:  # a semantic, not a check: llguidance records no stop token taken once nothing else may follow
        be.rollback(m, 1)
        out["rollback_1_after_stop_undoes_stop"] = finished and not be.finished(m) and torch.equal(mask(m), at_n)
    except Exception as exc:  # noqa: BLE001 - report what the library says
        out["rollback_1_after_stop_undoes_stop"] = f"refused: {str(exc).splitlines()[0][:80]}"
    full = be.matcher(compiled)
    feed(full, seq[:n])
    try:
        be.rollback(full, n)
        out["rollback_all_ok"] = torch.equal(mask(full), at0)
    except Exception as exc:  # noqa: BLE001
        out["rollback_all_ok"] = f"refused: {str(exc).splitlines()[0][:80]}"
    return out


STATE_GRAMMARS = ("json:nested", "lark:arith")


def control_char_probe(be: Any, hf: Any, vocab: Vocab) -> dict[str, Any]:
    """JSON forbids raw U+0000-U+001F in strings: after '"a', may the mask allow the single-byte token 0x1B (ESC)?
    Asked of a plain string, strings with maxLength / minLength, and one with a pattern."""
    import torch

    esc = next((i for i, b in enumerate(vocab.token_bytes) if b == b"\x1b"), None)
    if esc is None:
        return {"error": "no single-byte 0x1B token"}
    out = {}
    bitmask = torch.empty((1, (vocab.size + 31) // 32), dtype=torch.int32)
    for label, schema in (("string", {"type": "string"}), ("maxLength", {"type": "string", "maxLength": 30}),
                          ("minLength", {"type": "string", "minLength": 1}), ("pattern", {"type": "string", "pattern": "^a.*$"})):  # fmt: skip
        m = be.matcher(be.compile(Grammar("probe", "json", schema, "", compact=True)))
        for t in hf.encode('"a', add_special_tokens=False):
            be.accept(m, t)
        be.fill_row(m, bitmask, 0)
        out[label] = _bit(bitmask, 0, esc)
    return out


def _mode_name(threads: int) -> str:
    return "row by row" if threads == 0 else f"batch API x{threads}"


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a refused call is a finding
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def run_backend(name: str, args: argparse.Namespace, hf: Any, vocab: Vocab) -> dict[str, Any]:
    print(f"[{name}] tokenizer info ...", file=sys.stderr, flush=True)
    gc.collect()
    rss0 = _rss_mib()
    be = BACKENDS[name](hf, vocab, args.threads, args)
    res: dict[str, Any] = {
        "backend": name, "version": be.version, "tokenizer_build": be.tokenizer_build,
        "tokenizer_info_ms": be.tokenizer_info_s * 1e3, "tokenizer_info_rss_mib": _rss_mib() - rss0, "grammars": {},
    }  # fmt: skip
    words = (vocab.size + 31) // 32
    fill_modes = list(dict.fromkeys([1, args.threads, 0]))  # batch API on 1 and on N threads, row by row
    grammars = [g for g in all_grammars() if not args.grammars or any(s in g.name for s in args.grammars)]
    warm = be.compile(grammars[0])  # thread pools and first-call costs, outside every figure
    warm_seq = hf.encode(grammars[0].example_text(), add_special_tokens=False) + vocab.stop_ids[:1]
    for threads in fill_modes:
        measure_steps(be, warm, warm_seq, args.batch, 2, words, threads)
    bitmask_for_apply = None
    for i, g in enumerate(grammars):
        print(f"[{name}] {g.name} ...", file=sys.stderr, flush=True)
        seq = hf.encode(g.example_text(), add_special_tokens=False) + [vocab.stop_ids[0]]
        try:
            c = measure_compile(be, g, words, args.repeats)
        except Exception as exc:  # noqa: BLE001 - an unsupported grammar is a finding, not a crash
            res["grammars"][g.name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        compiled = c.pop("compiled")
        passes = {_mode_name(t): measure_steps(be, compiled, seq, args.batch, args.steps, words, t) for t in fill_modes}
        first = next(iter(passes.values()))
        if bitmask_for_apply is None or g.name == "json:nested":  # a real mid-generation mask
            bitmask_for_apply = first["last_bitmask"]
        res["grammars"][g.name] = {
            **c,
            "accept_us_per_token": statistics.mean(p["accept_us_per_token"] for p in passes.values()),
            "allowed_tokens_step0": first["allowed_tokens_step0"],
            "fill": {m: {k: p[k] for k in ("fill_ms_per_step", "fill_us_per_row", "errors")} for m, p in passes.items()},
            "smoke": smoke(be, compiled, g, vocab, args.samples, args.max_tokens, seed=i),
            "state": _guarded(state_checks, be, compiled, seq, words) if g.name in STATE_GRAMMARS else None,
        }
    if bitmask_for_apply is not None:
        res["apply"] = measure_apply(
            {"library kernel": be.apply, "torch shifts (ours)": apply_bitmask_torch,
             "numpy unpackbits (ours)": apply_bitmask_numpy},  # fmt: skip
            bitmask_for_apply, vocab.size,
        )
    res["raw_control_char_in_json_string"] = _guarded(control_char_probe, be, hf, vocab)
    nested = next((g for g in grammars if g.name == "json:nested"), None)
    if nested is not None:
        res["gil_during_compile"] = _gil_stall(be.compile_work(nested), seconds=args.gil_seconds)
    return res


# ---------------------------------------------------------------------------------------------------- report


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> bool:
    """Print the tables; True when every smoke and state check passed."""
    names = [r["backend"] for r in results]
    ratio = len(results) == 2
    print(f"\ntokenizer {meta['tokenizer']}: {meta['tokenizer_len']} tokens, model vocab {meta['vocab_size']}, "
          f"stop ids {meta['stop_ids']}; batch {meta['batch']}, {meta['steps']} steps, threads {meta['threads']}, "
          f"torch {meta['torch']}, {meta['cpu']}")  # fmt: skip

    def pair(get: Callable[[dict[str, Any]], Any], digits: int = 2) -> list[str]:
        vals = [get(r) for r in results]
        cells = [_fmt(v, digits) for v in vals]
        if ratio:
            a, b = vals
            num = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
            cells.append(f"{b / a:.2f}x" if num and a else "")
        return cells

    def ok_grammars(r: dict[str, Any]) -> list[dict[str, Any]]:
        return [g for g in r["grammars"].values() if "error" not in g]

    def mean_over(key: Callable[[dict[str, Any]], float]) -> Callable[[dict[str, Any]], float | None]:
        return lambda r: statistics.mean(key(g) for g in ok_grammars(r)) if ok_grammars(r) else None

    modes = list(dict.fromkeys(m for r in results for g in ok_grammars(r) for m in g["fill"]))
    head = ["", *names] + ([f"{names[1]} / {names[0]}"] if ratio else [])
    rows = [
        ["version", *pair(lambda r: r["version"])],
        ["tokenizer info built by", *pair(lambda r: r.get("tokenizer_build"))],
        ["tokenizer info ms (once per tokenizer)", *pair(lambda r: r["tokenizer_info_ms"])],
        ["tokenizer info RSS MiB", *pair(lambda r: r["tokenizer_info_rss_mib"])],
        ["compile ms, cold (mean over grammars)", *pair(mean_over(lambda g: g["compile_ms"]))],
        ["second request, same grammar, ms", *pair(mean_over(lambda g: g["second_request_ms"]), 3)],
        ["first mask after compile ms", *pair(mean_over(lambda g: g["first_mask_ms"]))],
    ]
    for m in modes:
        get = mean_over(lambda g, m=m: g["fill"][m]["fill_ms_per_step"])
        rows.append([f"fill {meta['batch']} rows, {m}: ms/step", *pair(get, 3)])
        rows.append(["  us/row", *pair(mean_over(lambda g, m=m: g["fill"][m]["fill_us_per_row"]), 1)])
    rows.append(["accept us/token", *pair(mean_over(lambda g: g["accept_us_per_token"]), 1)])
    for k in sorted({k for r in results for k in r.get("apply", {})}, key=lambda k: ("ours" in k, k)):
        rows.append([f"apply [{meta['batch']}, {meta['vocab_size']}] f32 ms: {k}",
                     *pair(lambda r, k=k: r.get("apply", {}).get(k, {}).get("ms"), 2)])  # fmt: skip
    for k in ("string", "maxLength", "minLength", "pattern"):
        rows.append([f"raw ESC allowed in a JSON string ({k})", *pair(lambda r, k=k: r.get("raw_control_char_in_json_string", {}).get(k))])
    rows.append(["json:nested compile, 1 thread, ms", *pair(lambda r: r.get("gil_during_compile", {}).get("call_ms"))])
    rows.append(["  longest main-thread GIL stall meanwhile ms",
                 *pair(lambda r: r.get("gil_during_compile", {}).get("max_stall_ms"))])  # fmt: skip
    for key in ("rollback_ok", "rollback_all_ok", "fork_ok", "restore_ok", "rollback_1_after_stop_undoes_stop",
                "rollback_us", "fork_us", "restore_us_per_token"):  # fmt: skip
        get = lambda r, key=key: (r["grammars"].get("json:nested", {}).get("state") or {}).get(key)  # noqa: E731
        rows.append([f"json:nested {key}", *pair(get, 1)])
    print("\n" + _table(head, rows))

    def per_grammar(cols: list[tuple[str, Callable[[dict[str, Any]], Any], int]]) -> None:
        head = ["grammar"] + [f"{c} {n[:3]}" for c, _, _ in cols for n in names]
        rows = []
        for gname in dict.fromkeys(n for r in results for n in r["grammars"]):
            row = [gname]
            for _, get, digits in cols:
                for r in results:
                    g = r["grammars"].get(gname)
                    row.append("ERR" if g is None or "error" in g else _fmt(get(g), digits))
            rows.append(row)
        print("\n" + _table(head, rows))

    def smoke_cell(g: dict[str, Any]) -> str:
        sm = g["smoke"]
        cell = f"{sm['valid']}/{sm['valid'] + sm['invalid'] + sm['unterminated']}"
        return cell + (f" ({sm['unterminated']} unterminated)" if sm["unterminated"] else "")

    per_grammar([
        ("compile ms", lambda g: g["compile_ms"], 2), ("2nd req ms", lambda g: g["second_request_ms"], 3),
        ("1st mask ms", lambda g: g["first_mask_ms"], 2), ("MiB", lambda g: g["compiled_mib"], 2),
        ("smoke", smoke_cell, 0),
    ])  # fmt: skip
    per_grammar([(f"{m} us/row", lambda g, m=m: g["fill"][m]["fill_us_per_row"], 1) for m in modes] + [
        ("accept us", lambda g: g["accept_us_per_token"], 1), ("allowed@0", lambda g: g["allowed_tokens_step0"], 0),
    ])  # fmt: skip

    problems = []
    for r in results:
        for gname, g in r["grammars"].items():
            if "error" in g:
                problems.append(f"{r['backend']} {gname}: {g['error']}")
                continue
            errs = [e for f in g["fill"].values() for e in f["errors"]] + g["smoke"]["failures"]
            problems += [f"{r['backend']} {gname}: {e}" for e in errs]
            st = g.get("state") or {}
            problems += [f"{r['backend']} {gname} state {k}: {v}" for k, v in st.items()
                         if k == "error" or (k.endswith("_ok") and v is not True)]  # fmt: skip
        for k, v in r.get("raw_control_char_in_json_string", {}).items():
            if v is not False:
                problems.append(f"{r['backend']} JSON string ({k}): raw control character allowed" if v is True else f"{r['backend']} control-char probe: {v}")
        for k, a in r.get("apply", {}).items():
            if "error" in a or not a["same_as_reference"]:
                problems.append(f"{r['backend']} apply {k}: {a.get('error', 'differs from the reference')}")
        for gname in ("json:nested", "json:nested/compact", "lark:arith"):
            ex = r["grammars"].get(gname, {}).get("smoke", {}).get("example")
            if ex:
                print(f"{r['backend']} {gname} sample: {ex[:160]!r}")
    if problems:
        print("\nproblems:\n  " + "\n  ".join(problems))
    return not problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="xgrammar,llguidance", help="comma-separated: " + ", ".join(BACKENDS))
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--vocab-size", type=int, default=None, help="model logits width (default: config.json)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="cold compiles per grammar (median)")
    p.add_argument("--samples", type=int, default=8, help="smoke outputs per grammar")
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--gil-seconds", type=float, default=1.0, help="length of the GIL probe")
    p.add_argument("--grammars", nargs="*", help="only grammars whose name contains one of these")
    p.add_argument("--llg-tokenizer", choices=("hf", "bytes"), default="hf",
                   help="llguidance tokenizer: llguidance.hf.from_tokenizer, or one built from the token bytes")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--merge", type=Path, nargs="+", help="print one table from earlier --json files and exit")
    args = p.parse_args()

    if args.merge:
        loaded = [json.loads(f.read_text()) for f in args.merge]
        return 0 if report([r for d in loaded for r in d["results"]], loaded[0]["meta"]) else 1

    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {', '.join(unknown)}; choices: {', '.join(BACKENDS)}")
    available = []
    for b in wanted:
        try:
            __import__({"xgrammar": "xgrammar", "llguidance": "llguidance"}[b])
            available.append(b)
        except ImportError as exc:
            print(f"skipping {b}: {exc}", file=sys.stderr)
    if not available:
        print("no backend importable here", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    hf = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = args.tokenizer / "config.json"
    vocab_size = args.vocab_size or (json.loads(cfg.read_text())["vocab_size"] if cfg.exists() else len(hf))
    gen = args.tokenizer / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
    stop_ids = sorted({*(eos if isinstance(eos, list) else [eos if eos is not None else hf.eos_token_id])})
    vocab = Vocab(hf, vocab_size, stop_ids)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    meta = {"tokenizer": str(args.tokenizer), "tokenizer_len": len(hf), "vocab_size": vocab_size,
            "stop_ids": stop_ids, "batch": args.batch, "steps": args.steps, "threads": args.threads,
            "torch": torch.__version__, "cpu": f"{cpu}, {os.cpu_count()} CPUs"}  # fmt: skip

    results = [run_backend(b, args, hf, vocab) for b in available]
    ok = report(results, meta)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
