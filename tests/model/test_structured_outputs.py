"""Structured outputs offline (``LLM`` + ``SamplingParams.structured_outputs``): what the constraint guarantees.

A random-weight model goes wherever the grammar lets it, so these tests check the guarantee itself: every
completion that ends with ``"stop"`` parses and satisfies its JSON schema (or matches its regex, or is one of
its choices), and most of them do stop. Schemas bound every string (``maxLength``, ``enum``, ``pattern``) and
array, and forbid additional properties, so a random walk through them ends; JSON is compact
(``disable_any_whitespace``), or free whitespace would let the model pad for hundreds of tokens.

Each scenario runs in a batch mixed with unconstrained requests, with ``n = 2``, and one under forced
preemption; every KV block comes back afterwards.
"""

from __future__ import annotations

import json
import pathlib
import random
import re
from typing import Any

import jsonschema
import pytest

from nanoserve import LLM, SamplingParams
from nanoserve.sampling_params import StructuredOutputsParams
from nanoserve.testing.checkpoints import build_checkpoint
from tests.conftest import assert_all_blocks_free

MAX_TOKENS = 192
PROMPTS = [[7, 19, 23, 31], [101, 5, 88], [44, 45, 46, 47, 48, 49], [300, 12]]


def _value_schema(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["integer", "short_string", "enum_string", "pattern_string", "boolean", "enum"]
    kinds += ["array", "object", "number"] if depth < 2 else []
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 10}
    if kind == "short_string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "enum_string":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "cyan", "dark grey"], 3)}
    if kind == "pattern_string":
        return {"type": "string", "pattern": "^[a-z]{1,6}$"}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": [1, "two", None, True][: rng.randint(2, 4)]}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": _value_schema(rng, 2), "minItems": low, "maxItems": low + rng.randint(0, 2)}
    return random_schema(rng, depth + 1)


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A random object schema: nested objects, bounded arrays, enums, bounded numbers, patterns, ``required``."""
    props = {f"k{j}": _value_schema(rng, depth) for j in range(rng.randint(1, 4 if depth == 0 else 2))}
    required = sorted(rng.sample(list(props), rng.randint(1, len(props))))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [random_schema(random.Random(seed)) for seed in range(24)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_checkpoint(tmp_path_factory.mktemp("structured") / "m", arch="qwen3", max_position_embeddings=512, seed=31)


def _json_params(schema: dict[str, Any], seed: int, n: int = 1, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    spec = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=max_tokens, structured_outputs=spec)


def _check_json(outputs: list[Any], schemas: list[dict[str, Any]]) -> tuple[int, int]:
    """Every stopped completion validates against its schema; returns (stopped, total)."""
    stopped = total = 0
    for out, schema in zip(outputs, schemas):
        for c in out.outputs:
            total += 1
            assert c.finish_reason in ("stop", "length"), c.finish_reason
            if c.finish_reason == "stop":
                stopped += 1
                jsonschema.validate(json.loads(c.text), schema)
    return stopped, total


def test_json_schemas_in_a_mixed_batch(model: pathlib.Path) -> None:
    """24 schemas (n = 2 for every third) beside unconstrained requests, all in one batch."""
    with LLM(str(model), max_model_len=512, kv_cache_memory="64MiB") as llm:
        prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(SCHEMAS))]
        params = [_json_params(s, seed=i, n=2 if i % 3 == 0 else 1) for i, s in enumerate(SCHEMAS)]
        free = SamplingParams(temperature=1.0, seed=99, max_tokens=24, ignore_eos=True)
        outputs = llm.generate(prompts + [{"prompt_token_ids": p} for p in PROMPTS], params + [free] * 4, use_tqdm=False)
        assert_all_blocks_free(llm.engine)
    stopped, total = _check_json(outputs[: len(SCHEMAS)], SCHEMAS)
    assert total == len(SCHEMAS) + len(SCHEMAS) // 3
    assert stopped >= 0.7 * total, f"only {stopped} of {total} constrained completions finished"
    # The unconstrained requests really were free: random text, not JSON.
    free_texts = [o.outputs[0].text for o in outputs[len(SCHEMAS) :]]
    assert all(len(o.outputs[0].token_ids) == 24 for o in outputs[len(SCHEMAS) :])
    assert not any(t.startswith("{") and t.endswith("}") for t in free_texts), free_texts


def test_json_under_preemption(model: pathlib.Path) -> None:
    """A KV cache far too small: constrained sequences are preempted and recomputed; their matchers must not
    be advanced twice (a recompute re-samples nothing), so every stopped completion still validates."""
    # 24 blocks of 4 tokens: one sequence (12-token prompt + 80 tokens) fits, a dozen running together do not.
    with LLM(str(model), max_model_len=96, kv_cache_memory=24 * 2048, block_size=4, max_num_batched_tokens=64) as llm:
        assert llm.engine.block_manager.num_blocks == 24
        schemas = SCHEMAS[:12]
        prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)] * 3} for i in range(len(schemas))]
        params = [_json_params(s, seed=100 + i, max_tokens=80) for i, s in enumerate(schemas)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0, "the cache was never short: nothing was preempted"
        assert_all_blocks_free(llm.engine)
    stopped, total = _check_json(outputs, schemas)
    assert stopped >= 0.6 * total, f"only {stopped} of {total} finished"


@pytest.mark.parametrize(
    "regex", [r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)", r"-?(0|[1-9][0-9]{0,3})", r"(yes|no|maybe)( really)?"]
)
def test_regex(model: pathlib.Path, regex: str) -> None:
    spec = StructuredOutputsParams(regex=regex)
    with LLM(str(model), max_model_len=512, kv_cache_memory="32MiB") as llm:
        params = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=64, structured_outputs=spec)
        out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    texts = [c.text for o in out for c in o.outputs if c.finish_reason == "stop"]
    assert len(texts) >= 9, [c.finish_reason for o in out for c in o.outputs]
    for t in texts:
        assert re.fullmatch(regex, t), (regex, t)


def test_choice_greedy_and_sampled(model: pathlib.Path) -> None:
    choices = ["alpha", "beta gamma", "delta-42", "{not json}"]
    spec = StructuredOutputsParams(choice=choices)
    with LLM(str(model), max_model_len=512, kv_cache_memory="32MiB") as llm:
        greedy = SamplingParams(temperature=0, max_tokens=32, structured_outputs=spec)
        sampled = SamplingParams(temperature=1.5, seed=3, n=4, max_tokens=32, structured_outputs=spec)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy, use_tqdm=False)
        outs += llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sampled, use_tqdm=False)
    seen = set()
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop" and c.text in choices, (c.finish_reason, c.text)
            seen.add(c.text)
    assert len(seen) >= 2, seen  # sampling reaches more than one choice: the mask is not a single path


def test_a_grammar_that_cannot_finish_in_time_ends_with_length(model: pathlib.Path) -> None:
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"s": {"type": "string", "minLength": 40}},
                                         "required": ["s"], "additionalProperties": False}, disable_any_whitespace=True)  # fmt: skip
    with LLM(str(model), max_model_len=512, kv_cache_memory="32MiB") as llm:
        out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=6, structured_outputs=spec), use_tqdm=False)
        assert_all_blocks_free(llm.engine)
    c = out[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 6
    assert c.text.startswith('{"s":"'), c.text


def test_lark_grammar(model: pathlib.Path) -> None:
    grammar = 'start: "(" item ("," item)* ")"\nitem: /[0-9]/ | "x"'
    spec = StructuredOutputsParams(grammar=grammar)
    with LLM(str(model), max_model_len=512, kv_cache_memory="32MiB") as llm:
        out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=48, structured_outputs=spec), use_tqdm=False)
    texts = [c.text for o in out for c in o.outputs if c.finish_reason == "stop"]
    assert len(texts) >= 4
    for t in texts:
        assert re.fullmatch(r"\((?:[0-9]|x)(?:,(?:[0-9]|x))*\)", t), t


@pytest.mark.parametrize(
    "spec,field",
    [
        (dict(json='{"type": "object", "properties": '), "structured_outputs.json"),
        (dict(json={"type": "object", "minProperties": "three"}), "structured_outputs.json"),
        (dict(regex="(unclosed"), "structured_outputs.regex"),
        (dict(grammar="start: undefined_rule"), "structured_outputs.grammar"),
    ],
)
def test_invalid_specs_are_refused_and_nothing_is_queued(model: pathlib.Path, spec: dict[str, Any], field: str) -> None:
    with LLM(str(model), max_model_len=512, kv_cache_memory="32MiB") as llm:
        with pytest.raises(ValueError, match=re.escape(field)):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        assert_all_blocks_free(llm.engine)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), "exactly one"),
        (dict(json={"type": "object"}, regex="a"), "exactly one"),
        (dict(choice=[]), "non-empty list"),
        (dict(choice=["a", 3]), "non-empty string"),
        (dict(regex=""), "non-empty string"),
        (dict(json=5), "JSON schema"),
    ],
)
def test_bad_structured_outputs_params(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)
