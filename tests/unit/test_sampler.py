"""The sampler on hand-made logits: penalty math (OpenAI/vLLM definitions) and the per-sequence penalty state
kept across steps, min_tokens masking, greedy, truncation (temperature, then min-p, then top-k / top-p, as vLLM
v1), the sampled distribution, seeds, log-probabilities, and settings at the edges (a top_k beyond the
vocabulary, seeds beyond 64 bits, tiny and huge temperatures)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from nanoserve.engine.sequence import Sequence
from nanoserve.layers.sampler import Sampler, _seed_for, _truncate, argmax_rows
from nanoserve.sampling_params import SamplingParams

EOS = 0
_ids = itertools.count()


def seq(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None, index: int = 0) -> Sequence:
    prompt = prompt if prompt is not None else [5]
    tokens = list(prompt) + list(output or [])
    return Sequence(next(_ids), "r", index, tokens, len(prompt), params)


def sample(logits: list[list[float]] | torch.Tensor, seqs: list[Sequence], sampler: Sampler | None = None) -> list[int]:
    sampler = sampler or Sampler({EOS}, seed=0)
    return sampler(torch.as_tensor(logits, dtype=torch.float32), seqs).token_ids


# ------------------------------------------------------------------------------------------------ penalties


def test_penalty_math_on_a_hand_made_row() -> None:
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, -0.5, 3.0])
    # prompt has tokens 1 and 2; the output so far is 2, 3, 3
    s = seq(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), [1, 2], [2, 3, 3])
    row = logits.clone()[None]
    Sampler({EOS}, seed=0)._apply_penalties(row, [s])
    expected = [
        1.0,  # never seen
        2.0 / 2.0,  # prompt only: repetition (positive -> divided); no presence/frequency (output only)
        -1.0 * 2.0 - 0.5 * 1 - 0.25,  # prompt and output once: repetition (negative -> multiplied), then both
        0.5 / 2.0 - 0.5 * 2 - 0.25,  # output twice: frequency counts occurrences, presence counts once
        -0.5,
        3.0,
    ]
    assert row[0].tolist() == pytest.approx(expected)


@pytest.mark.parametrize(
    "params, history, expected",
    [
        # token 0 has the higher logit (2.0 vs 1.9) and appeared once in the output
        (dict(frequency_penalty=0.05), [0], 0),  # 1.95 > 1.9
        (dict(frequency_penalty=0.15), [0], 1),  # 1.85 < 1.9
        (dict(frequency_penalty=0.06), [0, 0], 1),  # two occurrences: 2.0 - 0.12 < 1.9
        (dict(presence_penalty=0.15), [0], 1),  # 1.85 < 1.9
        (dict(presence_penalty=0.05), [0, 0, 0], 0),  # presence counts once, however often: 1.95 > 1.9
        (dict(repetition_penalty=1.1), [0], 1),  # 2.0 / 1.1 = 1.82 < 1.9
        (dict(repetition_penalty=1.01), [0], 0),  # 2.0 / 1.01 = 1.98
        (dict(frequency_penalty=-0.5), [1], 1),  # a negative penalty encourages the repeated token
    ],
)
def test_penalties_flip_greedy_choices(params: dict, history: list[int], expected: int) -> None:
    logits = [[2.0, 1.9, -5.0]]
    assert sample(logits, [seq(SamplingParams(temperature=0, **params), [2], history)]) == [expected]


def test_repetition_penalty_acts_on_the_prompt_and_in_the_right_direction_for_negative_logits() -> None:
    logits = [[-1.0, -1.05, -9.0]]
    # Token 0 only in the prompt: repetition covers prompt tokens. Its logit is negative, so it is multiplied
    # (-1.1, now below -1.05); dividing would have raised it to -0.91 and kept it on top.
    assert sample(logits, [seq(SamplingParams(temperature=0, repetition_penalty=1.1), [0])]) == [1]
    # presence/frequency ignore the prompt
    assert sample(logits, [seq(SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0), [0])]) == [0]


def test_penalties_only_touch_their_own_row() -> None:
    logits = [[2.0, 1.9, 0.0], [2.0, 1.9, 0.0]]
    penalized = seq(SamplingParams(temperature=0, presence_penalty=1.0), [2], [0])
    plain = seq(SamplingParams(temperature=0), [2], [0])
    assert sample(logits, [penalized, plain]) == [1, 0]


def test_logprobs_are_from_the_raw_logits() -> None:
    logits = torch.tensor([[2.0, 1.9, -5.0]])
    s = seq(SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=2), [2], [0])
    out = Sampler({EOS}, seed=0)(logits.clone(), [s])
    assert out.token_ids == [1]
    raw = torch.log_softmax(logits[0], dim=-1)
    lp = out.logprobs[0]
    assert lp is not None
    assert lp.token_logprob == pytest.approx(float(raw[1])) and lp.token_rank == 2
    assert lp.top_ids == [0, 1] and lp.top_logprobs == pytest.approx(raw[:2].tolist())


def reference_penalties(row: torch.Tensor, s: Sequence) -> torch.Tensor:
    """The penalties computed from scratch over the whole sequence (the sampler's definition before it kept
    state), for comparison with the kept state step by step: the results must be bit-identical."""
    row, params, vocab = row.clone(), s.params, row.shape[0]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(s.token_ids)), dtype=torch.long)
        seen = seen[seen < vocab]
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        output = torch.tensor(s.output_token_ids, dtype=torch.long)
        if output.numel():
            counts = torch.bincount(output[output < vocab], minlength=vocab).to(row.dtype)
            row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    return row


PENALTY_PARAMS = [
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0, presence_penalty=0.7),
    SamplingParams(temperature=0, frequency_penalty=-0.4),
    SamplingParams(temperature=0, repetition_penalty=0.8, presence_penalty=-0.3, frequency_penalty=0.25),
    SamplingParams(temperature=1.0, repetition_penalty=1.1, frequency_penalty=0.5),
]


def test_penalty_state_matches_a_from_scratch_reference_as_sequences_grow() -> None:
    """Sequences grow by random tokens (a few per step, sometimes a burst, some ids beyond the vocabulary, which
    are ignored) in a batch with a sequence without penalties; some sit out steps (preempted, or not scheduled)
    and come back with several new tokens; some finish (forget) and their seq_id is reused for new tokens."""
    vocab, rng = 23, random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab + 6) for _ in range(n)]

    sampler = Sampler({EOS}, seed=0)
    seqs = [seq(params, tokens(rng.randrange(0, 12)), tokens(rng.randrange(0, 3))) for params in PENALTY_PARAMS]
    seqs.append(seq(SamplingParams(temperature=0), tokens(4)))
    for step in range(60):
        batch = [s for s in seqs if rng.random() < 0.8]
        logits = torch.randn(len(batch), vocab) * 3
        expected = [reference_penalties(logits[i], s) for i, s in enumerate(batch)]
        sampler._apply_penalties(logits, batch)
        for i, s in enumerate(batch):
            assert torch.equal(logits[i], expected[i]), (step, s.params)
        for s in seqs:
            s.token_ids += tokens(rng.choice([0, 1, 1, 1, 2, 9]))
        if step % 20 == 9:  # a request ends; a new sequence takes its id, which only a cleared state gets right
            j = step % len(PENALTY_PARAMS)
            sampler.forget(seqs[j].seq_id)
            fresh = tokens(rng.randrange(1, 8))
            seqs[j] = Sequence(seqs[j].seq_id, "r", 0, fresh, len(fresh), seqs[j].params)
    assert set(sampler._penalty_states) == {s.seq_id for s in seqs[: len(PENALTY_PARAMS)]}  # none for the plain one
    for s in seqs:
        sampler.forget(s.seq_id)
    assert not sampler._penalty_states, "forget leaves penalty state behind"


@pytest.mark.parametrize("params", [dict(presence_penalty=0.15), dict(frequency_penalty=0.15), dict(repetition_penalty=1.1)])
def test_a_token_appended_after_the_first_step_is_penalised(params: dict) -> None:
    """The state is updated with the tokens appended since the last step, not built once."""
    sampler = Sampler({EOS}, seed=0)
    s = seq(SamplingParams(temperature=0, **params), [2], [])
    logits = torch.tensor([[2.0, 1.9, -5.0]])
    assert sampler(logits.clone(), [s]).token_ids == [0]
    s.token_ids.append(0)
    assert sampler(logits.clone(), [s]).token_ids == [1]  # 2.0 - 0.15 or 2.0 / 1.1 falls below 1.9
    s.token_ids.append(1)
    assert sampler(logits.clone(), [s]).token_ids == [0]  # both penalised now: 1.85 > 1.75 (1.82 > 1.73)


def test_forget_clears_penalty_state_and_only_penalised_sequences_get_any() -> None:
    sampler = Sampler({EOS}, seed=0)
    logits = torch.tensor([[2.0, 1.9, -5.0]])
    plain = seq(SamplingParams(temperature=0), [2], [0, 0])
    s = seq(SamplingParams(temperature=0, presence_penalty=0.15), [2], [0])
    assert sampler(logits.repeat(2, 1), [plain, s]).token_ids == [0, 1]
    assert list(sampler._penalty_states) == [s.seq_id]
    sampler.forget(s.seq_id)
    # Same seq_id, same length, other tokens: stale state (token 0 counted, nothing new to count) would pick 1.
    again = Sequence(s.seq_id, "r", 0, [2, 1], 1, s.params)
    assert sampler(logits.clone(), [again]).token_ids == [0]


# ------------------------------------------------------------------------------------------------ masking, greedy


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = [[5.0, 1.0, 4.0, 3.0]]  # EOS (0) most likely, then stop token 2
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    assert sample(logits, [seq(params, output=[])]) == [3]
    assert sample(logits, [seq(params, output=[1])]) == [3]
    assert sample(logits, [seq(params, output=[1, 1])]) == [0]  # min_tokens reached
    # ignore_eos: EOS is an ordinary token, only the explicit stop token is held back
    assert sample(logits, [seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2], ignore_eos=True))]) == [0]


def test_greedy_takes_the_first_of_equal_maxima() -> None:
    assert sample([[1.0, 3.0, 3.0, 0.0]], [seq(SamplingParams(temperature=0))]) == [1]


def test_a_mixed_batch_keeps_rows_apart() -> None:
    logits = [[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]]
    seqs = [seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=1.0, top_k=1)), seq(SamplingParams(temperature=0.5))]
    assert sample(logits, seqs) == [1, 0, 2]  # 9 vs 0 at T=0.5: the others have probability ~1e-8


# ------------------------------------------------------------------------------------------------ distribution

PROBS = [0.5, 0.3, 0.15, 0.05]
N = 4000  # rows per draw: the standard error of a frequency is below 0.008


def frequencies(params: SamplingParams, probs: list[float] = PROBS) -> list[float]:
    logits = torch.log(torch.tensor(probs)).repeat(N, 1)
    tokens = sample(logits, [seq(params) for _ in range(N)], Sampler({EOS}, seed=123))
    return [tokens.count(t) / N for t in range(len(probs))]


def test_plain_sampling_follows_softmax() -> None:
    assert frequencies(SamplingParams(temperature=1.0)) == pytest.approx(PROBS, abs=0.03)


def test_temperature_sharpens() -> None:
    sharp = [p**2 for p in PROBS]  # T = 0.5: p^(1/T), renormalised
    expected = [p / sum(sharp) for p in sharp]
    assert frequencies(SamplingParams(temperature=0.5)) == pytest.approx(expected, abs=0.03)


def test_top_k_keeps_the_k_most_likely() -> None:
    assert frequencies(SamplingParams(temperature=1.0, top_k=2)) == pytest.approx([0.625, 0.375, 0, 0], abs=0.03)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # 0.5 < 0.6, 0.5 + 0.3 >= 0.6: tokens 0 and 1 form the nucleus
    assert frequencies(SamplingParams(temperature=1.0, top_p=0.6)) == pytest.approx([0.625, 0.375, 0, 0], abs=0.03)
    freq = frequencies(SamplingParams(temperature=1.0, top_p=0.85))  # 0.5 + 0.3 < 0.85: token 2 too
    assert freq[3] == 0 and freq[2] > 0.1


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    freq = frequencies(SamplingParams(temperature=1.0, min_p=0.2))  # threshold 0.1: drops only 0.05
    assert freq[3] == 0
    assert freq[:3] == pytest.approx([p / 0.95 for p in PROBS[:3]], abs=0.03)


def kept(probs: list[float], params: SamplingParams) -> list[int]:
    """The tokens that survive truncation (their scaled logit is finite)."""
    out = _truncate(torch.log(torch.tensor([probs])), [params])
    return torch.isfinite(out[0]).nonzero().squeeze(1).tolist()


def test_min_p_comes_before_top_p_as_in_vllm_v1() -> None:
    """Probabilities 0.4, 0.3, 0.2, 0.1 with min_p=0.3 (threshold 0.12) and top_p=0.75. vLLM v1's order: min-p
    drops token 3 first; renormalised, the rest is 4/9, 3/9, 2/9, and the tokens before token 2 already hold
    7/9 >= 0.75, so top-p drops it too: {0, 1}. Top-p first would see 0.4 + 0.3 = 0.7 < 0.75 before token 2 and
    keep it: {0, 1, 2}. (Min-p alone is the same in either order: renormalising keeps the ratio to the top.)"""
    probs = [0.4, 0.3, 0.2, 0.1]
    params = SamplingParams(temperature=1.0, top_p=0.75, min_p=0.3)
    assert kept(probs, params) == [0, 1]
    assert kept(probs, SamplingParams(temperature=1.0, top_p=0.75)) == [0, 1, 2]  # top-p alone
    assert kept(probs, SamplingParams(temperature=1.0, min_p=0.3)) == [0, 1, 2]  # min-p alone
    assert kept(probs, SamplingParams(temperature=1.0, top_p=0.75, min_p=0.3, top_k=3)) == [0, 1]
    # And what is sampled: never token 2 (top-p first samples it 2/9 of the time), 0 and 1 as 4:3.
    assert frequencies(params, probs) == pytest.approx([4 / 7, 3 / 7, 0, 0], abs=0.03)


def test_min_p_is_relative_to_the_temperature_scaled_distribution() -> None:
    # T = 0.5 squares the probabilities: 0.16, 0.09, 0.04, 0.01 (then renormalised). min_p=0.2 of the top drops
    # token 3 (0.01 / 0.16 < 0.2) but not token 2 (0.25); on the unscaled distribution both would stay (0.25).
    assert kept([0.4, 0.3, 0.2, 0.1], SamplingParams(temperature=0.5, min_p=0.2)) == [0, 1, 2]
    assert kept([0.4, 0.3, 0.2, 0.1], SamplingParams(temperature=1.0, min_p=0.2)) == [0, 1, 2, 3]


def test_truncation_keeps_the_top_token_and_rows_apart() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    params = [SamplingParams(temperature=1.0, min_p=1.0, top_p=1e-9), SamplingParams(temperature=1.0, top_k=2)]
    before = logits.clone()
    out = _truncate(logits, params)
    assert torch.isfinite(out).tolist() == [[True, False, False, False], [False, False, True, True]]
    assert torch.equal(logits, before)  # the input is left as it was


# ------------------------------------------------------------------------------------------------ seeds


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    logits = torch.zeros(1, 50)  # uniform: every draw is pure generator output

    def draws(batch_before: int, seed: int = 7, index: int = 0) -> list[int]:
        sampler = Sampler({EOS}, seed=0)
        target = seq(SamplingParams(temperature=1.0, seed=seed), index=index)
        others = [seq(SamplingParams(temperature=1.0)) for _ in range(batch_before)]
        out = []
        for _ in range(8):
            rows = logits.repeat(batch_before + 1, 1)
            out.append(sampler(rows, others + [target]).token_ids[-1])
        return out

    alone = draws(0)
    assert draws(3) == alone and draws(1) == alone
    assert draws(0, seed=8) != alone
    assert draws(0, index=1) != alone  # the n samples of one seeded request get different streams


def test_forget_drops_a_finished_sequence_stream() -> None:
    sampler = Sampler({EOS}, seed=0)
    s = seq(SamplingParams(temperature=1.0, seed=3))
    first = [sampler(torch.zeros(1, 50), [s]).token_ids[0] for _ in range(5)]
    sampler.forget(s.seq_id)
    again = [sampler(torch.zeros(1, 50), [s]).token_ids[0] for _ in range(5)]
    assert again == first  # a fresh generator from the same seed


# ------------------------------------------------------------------------------------------------ edge settings
# Each of these crashed the engine thread (taking every request down), collided, or sampled a masked token before
# the sampler handled it.


@pytest.mark.parametrize("top_k", [5, 10**30, 2**63, 0, -1], ids=["5", "1e30", "2^63", "0", "-1"])  # of 4 tokens
def test_top_k_at_or_beyond_the_vocabulary_keeps_every_token(top_k: int) -> None:
    assert frequencies(SamplingParams(temperature=1.0, top_k=top_k)) == pytest.approx(PROBS, abs=0.03)


def test_top_k_minus_one_means_disabled_as_in_vllm() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    with pytest.raises(ValueError, match=r"SamplingParams\.top_k: .*0/-1 to disable"):
        SamplingParams(top_k=-2)


def seeded_draws(seed: int, index: int = 0, steps: int = 12) -> list[int]:
    """``steps`` draws from a uniform 1000-token row: pure generator output (two streams agree by chance with
    probability 1e-36)."""
    sampler = Sampler({EOS}, seed=0)
    target = seq(SamplingParams(temperature=1.0, seed=seed), index=index)
    return [sampler(torch.zeros(1, 1000), [target]).token_ids[0] for _ in range(steps)]


@pytest.mark.parametrize(
    "a, b",
    [
        ((5, 0), (5 + 2**32, 0)),  # torch's CPU generator keeps only the low 32 bits of a seed
        ((5, 0), (5 + 2**63, 0)),  # beyond a 63-bit mask
        ((-1, 0), (2**64 - 1, 0)),  # the same 64 bits, as a negative and as a positive integer
        ((-(2**70), 0), (-(2**70), 1)),  # the n samples of one request
        ((10**5000, 0), (10**5000 + 1, 0)),  # beyond what str() converts
        ((0, 1), (1, 0)),
    ],
    ids=["high-32-bits", "bit-63", "negative", "sample-index", "5000-digits", "swapped"],
)
def test_different_seeds_and_sample_indices_give_different_streams(a: tuple[int, int], b: tuple[int, int]) -> None:
    assert seeded_draws(*a) != seeded_draws(*b)
    assert seeded_draws(*a) == seeded_draws(*a)  # and each is reproducible
    assert all(0 <= _seed_for(*pair) < 2**63 for pair in (a, b))


@pytest.mark.parametrize("temperature", [1e-6, 1e-8, 1e-50, 5e-324])
def test_a_tiny_temperature_decodes_greedily(temperature: float) -> None:
    """Below SAMPLING_EPS: argmax, first of equal maxima, as vLLM. Dividing instead picked either tied token
    (1e-8), or turned the row into inf / NaN once the temperature underflowed float32 (1e-50)."""
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    rows = 200
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]]).repeat(rows, 1)
    assert sample(logits, [seq(params) for _ in range(rows)]) == [1] * rows
    assert not SamplingParams(temperature=1e-5).greedy  # the threshold itself samples


def test_a_huge_temperature_is_uniform_over_the_allowed_tokens() -> None:
    """1e300 becomes inf in float32, and -inf / inf is NaN, which argmax takes: the EOS that min_tokens masks
    (-inf) was sampled every time."""
    rows = 600
    params = SamplingParams(temperature=1e300, min_tokens=1)
    logits = torch.tensor([[9.0, 0.0, 5.0, -5.0]]).repeat(rows, 1)
    tokens = sample(logits, [seq(params) for _ in range(rows)], Sampler({EOS}, seed=5))
    assert EOS not in tokens
    assert [tokens.count(t) / rows for t in (1, 2, 3)] == pytest.approx([1 / 3] * 3, abs=0.08)


@pytest.mark.parametrize("top_k", [0, 2])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_k: int) -> None:
    assert frequencies(SamplingParams(temperature=1.0, top_p=1e-12, top_k=top_k)) == [1.0, 0, 0, 0]


def test_min_tokens_with_a_stop_id_outside_the_vocabulary() -> None:
    """The offline API does not know the vocabulary when it checks ``stop_token_ids``; masking one beyond it
    raised IndexError on the engine thread."""
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3, 10**6, 10**30])
    assert sample([[5.0, 1.0, 2.0, 4.0]], [seq(params)]) == [2]  # EOS (0) and stop token 3 are held back


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("repetition_penalty", float("inf")),
        pytest.param("repetition_penalty", 10**400, id="repetition_penalty-int-beyond-float"),
        ("top_p", float("nan")),
        ("min_p", float("-inf")),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}: must be a finite number, got "):
        SamplingParams(**{field: value})


def test_argmax_rows_is_argmax_first_of_ties_and_nan() -> None:
    """The greedy pick equals torch.argmax (transformers' greedy search) on ties, NaN and rows of many equal
    values; a faster reduction must not change which token wins."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (64, 151936), generator=g).float()  # every row: many-way ties for the maximum
    x[0] = 0.0
    x[1, 10], x[1, 90000] = 5.0, 5.0
    x[2, 7], x[2, 9] = float("nan"), float("nan")
    x[3, -1] = 9.0
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert argmax_rows(x)[:4].tolist() == [0, 10, 7, 151935]


def test_plain_greedy_is_false_for_whatever_edits_or_reads_the_logits() -> None:
    """The engine takes a step's tokens from the runner's argmax only when the sampler would take the plain
    argmax too: each of these makes it run the sampler."""
    def seq(**kwargs: object) -> Sequence:
        params = SamplingParams(**{"temperature": 0.0, **kwargs})
        return Sequence(1, "r", 0, [1, 2, 3], 3, params, 0.0)

    assert Sampler.plain_greedy([seq(), seq(top_k=1, temperature=0.7), seq(ignore_eos=True, stop_token_ids=[5])])
    for kwargs in (dict(temperature=0.7), dict(logprobs=0), dict(repetition_penalty=1.2), dict(presence_penalty=0.5),
                   dict(frequency_penalty=0.5), dict(logit_bias={4: 1.0}), dict(allowed_token_ids=[1, 2]),
                   dict(min_tokens=2)):  # fmt: skip
        assert not Sampler.plain_greedy([seq(), seq(**kwargs)]), kwargs
    constrained = seq()
    constrained.grammar = object()
    assert not Sampler.plain_greedy([constrained])
