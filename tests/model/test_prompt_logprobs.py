"""prompt_logprobs: the log-probability of each prompt token given the ones before it, and the top-k there,
against transformers' full-prompt logits on the same checkpoint, through chunked prefill, the prefix cache,
preemption and n > 1; the LM head runs over a bounded number of positions at a time."""

from __future__ import annotations

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.runner import model_runner
from nanoserve.testing.checkpoints import build_checkpoint
from nanoserve.testing.reference import load_hf_model
from tests.conftest import assert_all_blocks_free, make_prompts, token_prompts

VOCAB = 512
TOP_K = 3
LOGPROB_ATOL = 1e-4  # as in test_parity: fp32 on both sides, summed in a different order
PARAMS = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4, prompt_logprobs=TOP_K)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_checkpoint(tmp_path_factory.mktemp("plp") / "qwen3", "qwen3", max_position_embeddings=4096))


@pytest.fixture(scope="module")
def reference(model_dir: str):
    """prompt -> transformers' log-softmax over the whole prompt, [len, vocab] (one forward)."""
    model = load_hf_model(model_dir)
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logprobs(prompt: list[int]) -> torch.Tensor:
        key = tuple(prompt)
        if key not in cache:
            with torch.inference_mode():
                logits = model(torch.tensor([prompt])).logits[0].float()
            cache[key] = torch.log_softmax(logits, dim=-1)
        return cache[key]

    return logprobs


def assert_prompt_logprobs_match(prompt: list[int], got: list, ref: torch.Tensor) -> None:
    assert got is not None and len(got) == len(prompt), "one entry per prompt token"
    assert got[0] is None, "the first prompt token has nothing before it"
    for pos in range(1, len(prompt)):
        entry, row, token = got[pos], ref[pos - 1], prompt[pos]
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=LOGPROB_ATOL), f"position {pos}"
        # Rank: 1 + the tokens more likely. A token within float noise of this one (random weights make such
        # near-ties over a long prompt) may fall on either side of it, on either engine.
        surely_above = int((row > row[token] + LOGPROB_ATOL).sum())
        maybe_above = int((row > row[token] - LOGPROB_ATOL).sum()) - 1  # less the token itself
        assert surely_above + 1 <= entry[token].rank <= maybe_above + 1, f"position {pos}"
        top = sorted((lp.rank, t) for t, lp in entry.items() if t != token or lp.rank <= TOP_K)
        ref_top = row.topk(TOP_K)
        assert [t for _, t in top][:TOP_K] == ref_top.indices.tolist(), f"top-{TOP_K} at position {pos}"
        for t, v in zip(ref_top.indices.tolist(), ref_top.values.tolist()):
            assert entry[t].logprob == pytest.approx(v, abs=LOGPROB_ATOL)


def test_prompt_logprobs_match_transformers_through_chunked_prefill(model_dir: str, reference, monkeypatch) -> None:
    """Mixed prompt lengths, including a 2,048-token one, prefilled in chunks of 200 tokens; the LM head
    never sees more than PROMPT_LOGPROBS_ROWS positions at once."""
    rows_seen: list[int] = []
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", 64)
    prompts = make_prompts(VOCAB, 4, seed=5, min_len=1, max_len=90) + make_prompts(VOCAB, 1, seed=6, min_len=2048, max_len=2048)
    with LLM(model_dir, max_model_len=2100, max_num_batched_tokens=200, kv_cache_memory="24MiB", block_size=16) as llm:
        head = llm.engine.executor.runner.model.lm_head
        original = head.forward
        monkeypatch.setattr(head, "forward", lambda h: rows_seen.append(h.shape[0]) or original(h))
        outputs = llm.generate(token_prompts(prompts), PARAMS, use_tqdm=False)
        assert_all_blocks_free(llm.engine)
    for prompt, out in zip(prompts, outputs):
        assert_prompt_logprobs_match(prompt, out.prompt_logprobs, reference(prompt))
        assert out.outputs[0].finish_reason == "length"
    assert max(rows_seen) <= 64 and len(rows_seen) >= 2047 // 64, rows_seen
    # The reference itself varies: a constant distribution would make the comparison blind.
    ref = reference(prompts[-1])
    assert len(set(ref.argmax(-1).tolist())) > 20


def test_prompt_logprobs_do_not_read_the_prefix_cache_but_fill_it(model_dir: str, reference) -> None:
    """A cached prefix has no hidden states, so a prompt_logprobs request recomputes it (as vLLM does) and
    still gets every entry; a later plain request on the same prompt then hits the cache."""
    prompt = make_prompts(VOCAB, 1, seed=9, min_len=70, max_len=70)[0]
    plain = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4)
    with LLM(model_dir, max_model_len=256, kv_cache_memory="4MiB", block_size=16) as llm:
        (warm,) = llm.generate(token_prompts([prompt]), plain, use_tqdm=False)
        (again,) = llm.generate(token_prompts([prompt]), PARAMS, use_tqdm=False)
        (hit,) = llm.generate(token_prompts([prompt]), plain, use_tqdm=False)
        assert_all_blocks_free(llm.engine)
    assert warm.prompt_logprobs is None and hit.prompt_logprobs is None
    assert again.num_cached_tokens == 0
    assert_prompt_logprobs_match(prompt, again.prompt_logprobs, reference(prompt))
    assert hit.num_cached_tokens == 64
    assert again.outputs[0].token_ids == warm.outputs[0].token_ids == hit.outputs[0].token_ids


def test_prompt_logprobs_survive_preemption_and_n(model_dir: str, reference) -> None:
    """A KV cache too small for the batch: sequences are preempted mid-prompt and mid-decode and recomputed,
    and each request still has each prompt entry exactly once; with n = 2 the request carries them once."""
    prompts = make_prompts(VOCAB, 6, seed=13, min_len=40, max_len=90)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=24, prompt_logprobs=TOP_K, n=2)
    with LLM(model_dir, max_model_len=128, kv_cache_memory="160KiB", block_size=4, max_num_batched_tokens=32) as llm:
        outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        assert_all_blocks_free(llm.engine)
    for prompt, out in zip(prompts, outputs):
        assert_prompt_logprobs_match(prompt, out.prompt_logprobs, reference(prompt))
        assert len(out.outputs) == 2 and out.outputs[0].token_ids == out.outputs[1].token_ids


def test_streamed_delta_outputs_carry_prompt_logprobs_once(model_dir: str, reference) -> None:
    from nanoserve.sampling_params import RequestOutputKind

    prompt = make_prompts(VOCAB, 1, seed=17, min_len=50, max_len=50)[0]
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6, prompt_logprobs=0,
                            output_kind=RequestOutputKind.DELTA)  # fmt: skip
    with LLM(model_dir, max_model_len=128, kv_cache_memory="2MiB", max_num_batched_tokens=16) as llm:
        engine = llm.engine
        engine.add_request("r", prompt, params)
        deltas = []
        while engine.has_unfinished_requests():
            deltas += engine.step()
    carrying = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(carrying) == 1 and carrying[0] is deltas[0] and deltas[0].outputs[0].token_ids
    got = carrying[0].prompt_logprobs
    ref = reference(prompt)
    for pos in range(1, len(prompt)):
        assert set(got[pos]) == {prompt[pos]}, "k = 0: only the prompt token itself"
        assert got[pos][prompt[pos]].logprob == pytest.approx(float(ref[pos - 1, prompt[pos]]), abs=LOGPROB_ATOL)


@pytest.mark.parametrize("value", [-1, 21, 2.5, True])
def test_bad_prompt_logprobs_are_refused(value) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
