"""llguidance's view of the tokenizer built from token bytes (``build_ll_tokenizer``, linear in the vocabulary)
allows exactly the tokens that llguidance's own ``hf.from_tokenizer`` view allows, step after step through
JSON-schema, regex and choice grammars; and tokenizers that are not byte-level BPE take the library's path."""

from __future__ import annotations

import random

import llguidance
import llguidance.hf
import pytest
import torch

from nanoserve.engine import structured_output
from nanoserve.engine.structured_output import GrammarCompiler, build_ll_tokenizer
from nanoserve.sampling_params import StructuredOutputsParams
from nanoserve.testing.checkpoints import build_tokenizer

SPECS = [
    StructuredOutputsParams(json={"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                            "n": {"type": "integer", "minimum": -5, "maximum": 300}}, "required": ["name", "n"]}),
    StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
    StructuredOutputsParams(regex=r"(ab|cd)+[0-9]{2,4} \w+\."),
    StructuredOutputsParams(choice=["yes", "no", "maybe so"]),
]  # fmt: skip


def _allowed(matcher, vocab: int) -> torch.Tensor:
    bitmask = torch.zeros((1, -(-vocab // 32)), dtype=torch.int32)
    matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


@pytest.mark.parametrize("spec", SPECS, ids=["json", "json_object", "regex", "choice"])
def test_token_bytes_view_allows_what_from_tokenizer_allows(spec: StructuredOutputsParams) -> None:
    tokenizer = build_tokenizer(1200)
    vocab = len(tokenizer) + 40  # a model's embedding padded past the tokenizer (ids never allowed)
    eos = [tokenizer.eos_token_id]
    ours = build_ll_tokenizer(tokenizer, vocab, eos)
    theirs = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
    # from_tokenizer treats every added token as special; the bytes view treats non-special ones (the test
    # tokenizer's <|extra_N|> padding, Qwen's <tool_call>) as the text they spell, as xgrammar and vLLM do.
    text_added = [i for i, t in tokenizer.added_tokens_decoder.items() if not t.special]
    compared = torch.ones(vocab, dtype=torch.bool)
    compared[text_added] = False
    _, grammar = structured_output._grammar_text(spec)
    a, b = llguidance.LLMatcher(ours, grammar, log_level=0), llguidance.LLMatcher(theirs, grammar, log_level=0)
    assert not a.is_error() and not b.is_error()
    rng = random.Random(repr(spec))
    steps = 0
    while not a.is_stopped() and steps < 40:
        mask_a, mask_b = _allowed(a, vocab), _allowed(b, vocab)
        assert torch.equal(mask_a[compared], mask_b[compared]), f"masks differ at step {steps}"
        assert not mask_a[len(tokenizer) :].any(), "a padding id was allowed"
        choices = (mask_b & compared).nonzero().flatten().tolist()
        assert choices, "the grammar allowed nothing"
        token = rng.choice(choices)
        assert a.consume_token(token) and b.consume_token(token)
        steps += 1
    assert steps >= 2 and a.is_stopped() == b.is_stopped()


def test_many_added_tokens_take_the_bytes_path_and_a_sentencepiece_tokenizer_does_not(monkeypatch) -> None:
    """The byte-level check decides the path: it is what keeps a tokenizer with 100k+ added tokens from
    from_tokenizer's quadratic build, and what keeps SentencePiece pieces (``▁the``) away from the byte
    alphabet, which would mis-read them."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    calls = []
    monkeypatch.setattr(llguidance.hf, "from_tokenizer", lambda *a, **k: calls.append(a) or "library view")
    byte_level = build_tokenizer(1200)
    assert structured_output._byte_level_token_bytes(byte_level, len(byte_level)) is not None
    assert build_ll_tokenizer(byte_level, len(byte_level), [0]) != "library view" and not calls

    sp = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}, merges=[("▁", "a")], unk_token="<unk>"))
    sp.decoder = decoders.Metaspace()
    spm = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="<unk>")
    assert structured_output._byte_level_token_bytes(spm, len(spm)) is None
    assert build_ll_tokenizer(spm, len(spm), [0]) == "library view" and len(calls) == 1


def test_compiler_prepare_and_cache_hooks() -> None:
    tokenizer = build_tokenizer(1200)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    compiler.prepare()
    spec = SPECS[0]
    assert not compiler.cached(spec)
    first = compiler.compile(spec)
    assert compiler.cached(spec) and compiler.compile(spec) is first
    compiler.clear_cache()
    assert not compiler.cached(spec) and compiler.compile(spec) is not first
