"""logit_bias, allowed_token_ids and bad_words: on hand-made logits in the sampler, through the engine (token
ids checked against the vocabulary, bad words tokenized with and without a leading space), and over HTTP."""

from __future__ import annotations

import itertools
import pathlib

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.engine.sequence import Sequence
from nanoserve.layers.sampler import Sampler
from nanoserve.testing.checkpoints import build_checkpoint

EOS = 0
_ids = itertools.count()


def _seq(params: SamplingParams, output: list[int] | None = None) -> Sequence:
    tokens = [5, *(output or [])]
    return Sequence(next(_ids), "r", 0, tokens, 1, params)


def _greedy(logits: list[float], params: SamplingParams, output: list[int] | None = None) -> int:
    return Sampler({EOS}, seed=0)(torch.tensor([logits]), [_seq(params, output)]).token_ids[0]


def test_logit_bias_moves_the_argmax_and_leaves_logprobs_raw() -> None:
    logits = [0.0, 1.0, 3.0, 2.0]
    assert _greedy(logits, SamplingParams(temperature=0)) == 2
    assert _greedy(logits, SamplingParams(temperature=0, logit_bias={3: 1.5})) == 3
    assert _greedy(logits, SamplingParams(temperature=0, logit_bias={2: -100})) == 3
    out = Sampler({EOS}, seed=0)(torch.tensor([logits]), [_seq(SamplingParams(temperature=0, logprobs=1, logit_bias={1: 5}))])
    assert out.token_ids == [1]
    # the log-probability reported is the model's own (vLLM's raw logprobs), not the biased one
    assert out.logprobs[0].token_logprob == pytest.approx(float(torch.log_softmax(torch.tensor(logits), 0)[1]))


def test_allowed_token_ids_confine_sampling() -> None:
    torch.manual_seed(0)
    logits = torch.randn(40).tolist()
    allowed = [3, 17, 29]
    sampler = Sampler({EOS}, seed=1)
    seqs = [_seq(SamplingParams(temperature=2.0, allowed_token_ids=allowed)) for _ in range(200)]
    got = sampler(torch.tensor([logits] * 200), seqs).token_ids
    assert set(got) == set(allowed)  # all of them reachable, nothing else
    best = max(allowed, key=lambda t: logits[t])
    assert _greedy(logits, SamplingParams(temperature=0, allowed_token_ids=allowed)) == best


def test_bad_words_ban_single_tokens_always_and_sequences_after_their_prefix() -> None:
    logits = [0.0, 5.0, 4.0, 3.0, 2.0]
    params = SamplingParams(temperature=0)
    params._bad_words_token_ids = ((1,), (3, 2))  # what the engine makes of two bad words
    assert _greedy(logits, params) == 2  # token 1 is never allowed
    assert _greedy(logits, params, output=[3]) == 3  # after 3, token 2 would complete "3 2": banned
    assert _greedy(logits, params, output=[2]) == 2  # the prefix is not there: 2 is fine


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(logit_bias={1: 101}), r"\[-100, 100\]"),
        (dict(logit_bias={-1: 1.0}), "token ids"),
        (dict(logit_bias={1: float("nan")}), "finite"),
        (dict(allowed_token_ids=[]), "non-empty"),
        (dict(allowed_token_ids=[1, -2]), "token ids"),
        (dict(bad_words=["ok", ""]), "non-empty strings"),
    ],
)
def test_bad_values_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_checkpoint(tmp_path_factory.mktemp("restrict") / "m", arch="qwen3", seed=41)


def test_through_the_engine(model: pathlib.Path) -> None:
    prompt = [{"prompt_token_ids": [7, 8, 9, 10]}]
    with LLM(str(model), kv_cache_memory="16MiB") as llm:
        free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
        tokens = free.outputs[0].token_ids
        assert len(set(tokens)) > 2  # the model's own choices vary, so the bans below change something
        # Forbid the model's favourite first token: it must pick another.
        banned = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                     logit_bias={tokens[0]: -100}), use_tqdm=False)[0]  # fmt: skip
        assert tokens[0] not in banned.outputs[0].token_ids[:1]
        allowed = [40, 41, 42]
        confined = llm.generate(prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True,
                                                       allowed_token_ids=allowed), use_tqdm=False)[0]  # fmt: skip
        assert set(confined.outputs[0].token_ids) <= set(allowed)
        # bad_words: a word the free run produced (its text, decoded) never appears when banned
        word = llm.get_tokenizer().decode([tokens[1]]).strip()
        if word:
            ids = llm.get_tokenizer().encode(word, add_special_tokens=False)
            out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[word]),
                               use_tqdm=False)[0]  # fmt: skip
            got = out.outputs[0].token_ids
            assert all(tuple(got[i : i + len(ids)]) != tuple(ids) for i in range(len(got))), (word, ids, got)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate(prompt, SamplingParams(allowed_token_ids=[10**6]), use_tqdm=False)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate(prompt, SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
