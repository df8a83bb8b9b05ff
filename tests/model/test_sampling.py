"""Sampling end to end on a tiny checkpoint: greedy equivalences, seeds, stop conditions, parallel samples,
penalties against a transformers-driven reference, and log-probabilities against transformers' own.

The math of the sampler on hand-made logits is tested without a model in ``tests/unit/test_sampler.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.engine.llm_engine import LLMEngine
from tests.conftest import (
    CheckpointCache,
    ReferenceCache,
    assert_all_blocks_free,
    make_prompts,
    token_prompts,
    vocab_size_of,
)

NAME = "qwen3-gqa"
BLOCK_SIZE = 4
LOGPROB_ATOL = 1e-4  # fp32 engine vs fp32 transformers; see test_parity.py
EOS_IDS = (0, 2)  # <|endoftext|>, <|im_end|> (generation_config.json)


@pytest.fixture(scope="module")
def llm(checkpoint: CheckpointCache) -> Iterator[LLM]:
    """One engine for the module; every test leaves it with all blocks free (checked)."""
    with LLM(str(checkpoint(NAME)), block_size=BLOCK_SIZE, kv_cache_memory="2MiB", max_model_len=128) as engine:
        yield engine


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(vocab_size_of(NAME), 4, seed=40, min_len=3, max_len=30)


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list:
    outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    assert_all_blocks_free(llm.engine)
    return outputs


def greedy(max_tokens: int = 20, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens, **kw)


# ------------------------------------------------------------------------------------------------ greedy and seeds


def test_top_k_1_equals_greedy(llm: LLM, prompts: list[list[int]], hf_reference: ReferenceCache) -> None:
    refs = hf_reference(NAME, prompts, 20)
    top1 = generate(llm, prompts, SamplingParams(temperature=1.5, top_k=1, ignore_eos=True, max_tokens=20))
    assert [o.outputs[0].token_ids for o in top1] == [r.token_ids for r in refs]
    # A top_p so small that only the most likely token survives is greedy as well.
    tiny_p = generate(llm, prompts, SamplingParams(temperature=1.0, top_p=1e-6, ignore_eos=True, max_tokens=20))
    assert [o.outputs[0].token_ids for o in tiny_p] == [r.token_ids for r in refs]


def test_same_seed_same_tokens_alone_or_in_any_batch(llm: LLM, prompts: list[list[int]]) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, ignore_eos=True, max_tokens=24)
    (alone,) = generate(llm, prompts[:1], seeded)
    tokens = alone.outputs[0].token_ids
    assert len(tokens) == 24
    others = [
        SamplingParams(temperature=0.8, ignore_eos=True, max_tokens=30),  # unseeded: draws from the engine's stream
        SamplingParams(temperature=1.0, seed=99, ignore_eos=True, max_tokens=10),
        greedy(5),
    ]
    batch = generate(llm, prompts[1:] + prompts[:1], others + [seeded])
    assert batch[-1].outputs[0].token_ids == tokens
    batch = generate(llm, prompts[:1] + prompts[1:] + prompts[:1], [seeded] + others + [seeded])
    assert batch[0].outputs[0].token_ids == tokens and batch[-1].outputs[0].token_ids == tokens

    # Sampling really happened, and a different seed gives a different continuation.
    (greedy_out,) = generate(llm, prompts[:1], greedy(24))
    assert tokens != greedy_out.outputs[0].token_ids
    differs = [
        generate(llm, prompts[:1], SamplingParams(temperature=1.0, seed=s, ignore_eos=True, max_tokens=24))[0]
        .outputs[0].token_ids
        for s in (1, 2)
    ]  # fmt: skip
    assert differs[0] != tokens and differs[1] != tokens and differs[0] != differs[1]


def test_seed_is_independent_of_scheduling(checkpoint: CheckpointCache, llm: LLM, prompts: list[list[int]]) -> None:
    """Chunked prefill, a different block size and preemption change the steps, not a seeded request's tokens."""
    seeded = SamplingParams(temperature=1.0, seed=77, ignore_eos=True, max_tokens=30)
    expected = [o.outputs[0].token_ids for o in generate(llm, prompts, seeded)]
    bytes_per_block = llm.kv_cache_info()["bytes_per_block"][0]
    with LLM(
        str(checkpoint(NAME)), block_size=BLOCK_SIZE, max_num_batched_tokens=8, max_model_len=64,
        kv_cache_memory=18 * bytes_per_block,
    ) as small:  # fmt: skip
        got = [o.outputs[0].token_ids for o in generate(small, prompts, seeded)]
        assert small.engine.scheduler.num_preemptions > 0
    assert got == expected


# ------------------------------------------------------------------------------------------------ stop conditions


def _ascii_window(text: str, start: int, width: int) -> tuple[str, int] | None:
    """The first ``width``-character run of letters/digits at or after ``start`` in ``text``."""
    m = re.compile(rf"[A-Za-z0-9]{{{width}}}").search(text, start)
    return (m.group(0), m.start()) if m else None


def test_stop_strings_end_the_text_before_them(llm: LLM, prompts: list[list[int]]) -> None:
    full = generate(llm, prompts, greedy(30))
    checked = 0
    for prompt, out in zip(prompts, full):
        text, tokens = out.outputs[0].text, out.outputs[0].token_ids
        found = _ascii_window(text, 4, 3)
        if found is None:
            continue
        stop, _ = found
        cut = text.find(stop)  # the first occurrence is where generation must stop
        (res,) = generate(llm, [prompt], greedy(30, stop=[stop]))
        c = res.outputs[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop)
        assert c.text == text[:cut]
        assert c.token_ids == tokens[: len(c.token_ids)] and len(c.token_ids) < len(tokens)
        # it stopped on the token that completed the stop string, not later
        decode = llm.get_tokenizer().decode
        assert len(c.token_ids) == min(
            n for n in range(1, len(tokens) + 1) if stop in decode(tokens[:n], skip_special_tokens=True)
        )

        # The token that completes the stop string is also the last one max_tokens allows: still a stop.
        (last,) = generate(llm, [prompt], greedy(len(c.token_ids), stop=[stop]))
        assert (last.outputs[0].finish_reason, last.outputs[0].stop_reason) == ("stop", stop)
        assert last.outputs[0].text == c.text and last.outputs[0].token_ids == c.token_ids

        (kept,) = generate(llm, [prompt], greedy(30, stop=[stop], include_stop_str_in_output=True))
        assert kept.outputs[0].text == text[:cut] + stop and kept.outputs[0].token_ids == c.token_ids

        # With several stop strings the earliest in the text wins, whatever the list order.
        later = _ascii_window(text, cut + len(stop) + 2, 2)
        if later is not None:
            (both,) = generate(llm, [prompt], greedy(30, stop=[later[0], stop]))
            assert (both.outputs[0].stop_reason, both.outputs[0].text) == (stop, text[:cut])
        checked += 1
    assert checked >= 2, "too few continuations with a usable stop string; pick other prompts"

    # A stop string that never appears changes nothing.
    (never,) = generate(llm, prompts[:1], greedy(30, stop=["\u2603never\u2603"]))
    assert never.outputs[0].finish_reason == "length" and never.outputs[0].text == full[0].outputs[0].text


def test_stop_token_ids(llm: LLM, prompts: list[list[int]]) -> None:
    full = generate(llm, prompts, greedy(20))
    for prompt, out in zip(prompts, full):
        tokens = out.outputs[0].token_ids
        k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i] and tokens[i] not in EOS_IDS)
        stop_token = tokens[k]
        (res,) = generate(llm, [prompt], greedy(20, stop_token_ids=[stop_token]))
        c = res.outputs[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop_token)
        assert c.token_ids == tokens[: k + 1]  # the stop token is kept in token_ids ...
        (upto,) = generate(llm, [prompt], greedy(k))
        assert c.text == upto.outputs[0].text  # ... but not shown in the text

        # min_tokens past k: the stop token is suppressed until then, so generation must go another way.
        (late,) = generate(llm, [prompt], greedy(20, stop_token_ids=[stop_token], min_tokens=k + 3))
        lt = late.outputs[0].token_ids
        assert len(lt) >= k + 3 and stop_token not in lt[: k + 3]
        assert lt[:k] == tokens[:k] and lt[k] != stop_token


def test_eos_stops_generation_unless_ignored(llm: LLM, hf_reference: ReferenceCache) -> None:
    """Find prompts whose greedy continuation contains an EOS id, then check the engine stops right there."""
    candidates = make_prompts(vocab_size_of(NAME), 12, seed=41, min_len=2, max_len=24)
    refs = hf_reference(NAME, candidates, 20)
    with_eos = [(p, r.token_ids) for p, r in zip(candidates, refs) if set(r.token_ids) & set(EOS_IDS)]
    assert with_eos, "no greedy continuation hits EOS; pick other candidate prompts"
    outs = generate(llm, [p for p, _ in with_eos], SamplingParams(temperature=0, max_tokens=20))
    for out, (_, ref) in zip(outs, with_eos):
        first = next(i for i, t in enumerate(ref) if t in EOS_IDS)
        c = out.outputs[0]
        assert c.token_ids == ref[: first + 1] and c.finish_reason == "stop"


# ------------------------------------------------------------------------------------------------ parallel samples


def test_n_samples_share_prompt_blocks(checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    prompt = make_prompts(vocab_size_of(NAME), 1, seed=42, min_len=29, max_len=29)[0]
    n = 4
    config = EngineConfig.create(
        str(checkpoint(NAME)), block_size=BLOCK_SIZE, kv_cache_memory="1MiB", max_model_len=96,
        enable_prefix_caching=False,  # sharing between samples must not depend on the prefix cache
    )  # fmt: skip
    engine = LLMEngine(config)
    try:
        engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(n=n, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))
        seqs = [s.seq for s in engine.requests["r"].samples]
        peak_used = 0
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                final = out
            peak_used = max(peak_used, engine.block_manager.num_blocks - engine.block_manager.num_free_blocks)
            if not seqs[0].is_finished and all(s.num_computed_tokens >= len(prompt) for s in seqs):
                shared = (len(prompt) - 1) // BLOCK_SIZE
                assert all(s.block_ids[:shared] == seqs[0].block_ids[:shared] for s in seqs if s.block_ids)
        unshared = n * engine.block_manager.blocks_needed(len(prompt) + 12)
        # n copies of the prompt would need n * 8 blocks for it alone; shared, it is held once.
        assert peak_used <= engine.block_manager.blocks_needed(len(prompt)) + n * 4 < unshared
        assert final is not None and final.finished
        assert sorted(c.index for c in final.outputs) == list(range(n))
        assert len({tuple(c.token_ids) for c in final.outputs}) == n, "samples of one request should differ"
        assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in final.outputs)
        assert_all_blocks_free(engine)
    finally:
        engine.shutdown()

    # Greedy n>1 on shared blocks: every sample equals transformers' continuation.
    (ref,) = hf_reference(NAME, [prompt], 12)
    with LLM(str(checkpoint(NAME)), block_size=BLOCK_SIZE, kv_cache_memory="1MiB", max_model_len=96) as llm:
        (out,) = generate(llm, [prompt], SamplingParams(n=3, temperature=0, ignore_eos=True, max_tokens=12))
        assert [c.token_ids for c in out.outputs] == [ref.token_ids] * 3
        # Samples 1 and 2 reuse sample 0's blocks, but that is no prefix-cache hit: one lookup, nothing cached.
        stats = llm.engine.block_manager.stats
        assert (stats.queries, stats.hits) == (len(prompt), 0)
        # The same prompt again is a real hit, counted once for the request.
        generate(llm, [prompt], SamplingParams(n=3, temperature=0, ignore_eos=True, max_tokens=2))
        assert (stats.queries, stats.hits) == (2 * len(prompt), ((len(prompt) - 1) // BLOCK_SIZE) * BLOCK_SIZE)


# ------------------------------------------------------------------------------------------------ penalties


def _penalized_greedy_reference(
    model: object, prompt: list[int], max_tokens: int, presence: float, frequency: float, repetition: float
) -> tuple[list[int], float]:
    """Greedy decoding with OpenAI/vLLM penalties, written independently of nanoserve on transformers'
    logits (a full forward each step). Returns the tokens and the smallest top-2 gap after penalties."""
    ids = list(prompt)
    out: list[int] = []
    min_gap = math.inf
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()  # type: ignore[operator]
        for t in set(ids):  # repetition: prompt and output tokens; shrink toward "less likely"
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):  # presence once per seen token, frequency per occurrence: output tokens only
            logits[t] -= presence + frequency * out.count(t)
        top2 = torch.topk(logits, 2).values
        min_gap = min(min_gap, float(top2[0] - top2[1]))
        token = int(torch.argmax(logits))
        out.append(token)
        ids.append(token)
    return out, min_gap


@pytest.mark.parametrize(
    "presence, frequency, repetition",
    [(0.0, 0.0, 1.3), (0.0, 0.4, 1.0), (0.7, 0.0, 1.0), (0.5, 0.3, 1.2), (-0.5, -0.2, 0.8)],
)
def test_penalties_match_a_reference_on_transformers_logits(
    llm: LLM, prompts: list[list[int]], hf_reference: ReferenceCache, presence: float, frequency: float, repetition: float
) -> None:
    model = hf_reference.model(NAME)
    params = greedy(16, presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition)
    outs = generate(llm, prompts[:2], params)
    plain = [r.token_ids for r in hf_reference(NAME, prompts[:2], 16)]
    for prompt, out in zip(prompts[:2], outs):
        expected, min_gap = _penalized_greedy_reference(model, prompt, 16, presence, frequency, repetition)
        assert min_gap > 1e-4, "a near tie makes this comparison fragile; pick another prompt"
        assert out.outputs[0].token_ids == expected
    assert [o.outputs[0].token_ids for o in outs] != plain, "the penalty should change these continuations"


def test_repetition_penalty_reduces_repeats(llm: LLM) -> None:
    prompts = make_prompts(vocab_size_of(NAME), 6, seed=3, min_len=4, max_len=30)

    def repeats(penalty: float) -> int:
        outs = generate(llm, prompts, greedy(60, repetition_penalty=penalty))
        return sum(len(o.outputs[0].token_ids) - len(set(o.outputs[0].token_ids)) for o in outs)

    baseline = repeats(1.0)
    assert baseline >= 10, "the baseline must repeat itself for this test to mean anything"
    assert repeats(1.5) < baseline / 3


# ------------------------------------------------------------------------------------------------ logprobs


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_top_k_match_transformers(llm: LLM, prompts: list[list[int]], hf_reference: ReferenceCache, k: int) -> None:
    model = hf_reference.model(NAME)
    params = SamplingParams(temperature=1.0, seed=3, ignore_eos=True, max_tokens=12, logprobs=k)
    outs = generate(llm, prompts[:2], params)
    saw_unlikely = False
    for prompt, out in zip(prompts[:2], outs):
        c = out.outputs[0]
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 12
        with torch.no_grad():
            ids = torch.tensor([prompt + c.token_ids[:-1]])
            ref = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 :].float(), dim=-1)  # [12, V]
        for step, (entry, token) in enumerate(zip(c.logprobs, c.token_ids)):
            assert token in entry
            assert len(entry) in (k, k + 1)  # the top k, plus the chosen token when it is not among them
            row = ref[step]
            assert entry[token].logprob == pytest.approx(float(row[token]), abs=LOGPROB_ATOL)
            # rank = 1 + how many tokens are more likely (ties within the tolerance may go either way)
            assert 1 + int((row > row[token] + LOGPROB_ATOL).sum()) <= entry[token].rank
            assert entry[token].rank <= 1 + int((row > row[token] - LOGPROB_ATOL).sum())
            top = sorted((tid for tid in entry if entry[tid].rank <= k), key=lambda t: entry[t].rank)
            assert len(top) == k
            assert [entry[t].rank for t in top] == list(range(1, k + 1))
            ref_top = torch.topk(row, k)
            assert top == ref_top.indices.tolist()
            assert [entry[t].logprob for t in top] == pytest.approx(ref_top.values.tolist(), abs=LOGPROB_ATOL)
            saw_unlikely |= entry[token].rank > max(k, 1)
        total = sum(entry[t].logprob for entry, t in zip(c.logprobs, c.token_ids))
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert saw_unlikely, "temperature 1 should sample some token outside the top k"


def test_no_logprobs_unless_asked(llm: LLM, prompts: list[list[int]]) -> None:
    (out,) = generate(llm, prompts[:1], greedy(4))
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None


def test_top_k_limits_the_sampled_ranks(llm: LLM, prompts: list[list[int]]) -> None:
    params = SamplingParams(temperature=2.0, top_k=3, seed=8, ignore_eos=True, max_tokens=30, logprobs=3)
    ranks = [
        entry[t].rank
        for out in generate(llm, prompts, params)
        for entry, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)
    ]
    assert max(ranks) <= 3 and len(set(ranks)) == 3  # only the 3 most likely tokens, and all of them occur
