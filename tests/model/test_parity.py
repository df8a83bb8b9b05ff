"""Greedy parity with transformers, token for token in float32, under every scheduling path.

transformers (``nanoserve.testing.reference.hf_greedy``: one prompt at a time, eager attention, EOS ignored)
is the oracle. Each scenario below also proves that the path it names was really taken (chunks split,
prefix-cache hits, preemptions, a preempted request re-admitted onto cached blocks), so a scenario cannot
pass by silently degenerating into the easy case.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from nanoserve import LLM, RequestOutput, SamplingParams
from nanoserve.engine.step import SchedulerOutput
from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS
from tests.conftest import (
    FIRST_PLAIN_TOKEN,
    CheckpointCache,
    ReferenceCache,
    assert_all_blocks_free,
    make_prompts,
    token_prompts,
    vocab_size_of,
)

MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS, logprobs=0)
# fp32 on both sides; the engine's paged attention sums in a different order than transformers' eager
# attention, which moves log-probs by ~1e-5 at most on these models (measured). 1e-4 leaves headroom while a
# wrong position, mask or scale moves them by orders of magnitude more.
LOGPROB_ATOL = 1e-4
BLOCK_SIZE = 4
SCENARIO_ARCHS = ["qwen3-gqa", "qwen2-mqa-bias"]  # GQA with head_dim != hidden/heads; MQA with qkv bias


def assert_matches_reference(outputs: list[RequestOutput], refs: list[Any], prompts: list[list[int]]) -> None:
    assert len(outputs) == len(refs) == len(prompts)
    for i, (out, ref, prompt) in enumerate(zip(outputs, refs, prompts)):
        assert out.prompt_token_ids == prompt, f"request {i}: outputs not in input order"
        (completion,) = out.outputs
        assert completion.token_ids == ref.token_ids, (
            f"request {i} (prompt of {len(prompt)} tokens) differs from transformers at step "
            f"{next((j for j, (a, b) in enumerate(zip(completion.token_ids, ref.token_ids)) if a != b), None)}"
        )
        assert completion.finish_reason == "length"
        assert completion.logprobs is not None and len(completion.logprobs) == len(ref.logprobs)
        for step, (entry, token, ref_lp) in enumerate(zip(completion.logprobs, completion.token_ids, ref.logprobs)):
            assert entry[token].logprob == pytest.approx(ref_lp, abs=LOGPROB_ATOL), f"request {i} step {step}"


# ------------------------------------------------------------------------------------------- every architecture


@pytest.mark.parametrize("name", list(DEFAULT_ARCH_CONFIGS))
def test_greedy_parity_every_architecture(
    name: str, checkpoint: CheckpointCache, hf_reference: ReferenceCache
) -> None:
    seed = list(DEFAULT_ARCH_CONFIGS).index(name)
    prompts = make_prompts(vocab_size_of(name), 6, seed=seed, min_len=1, max_len=40)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    # The oracle must not be trivially constant, or parity would prove nothing about attention.
    assert all(len(set(r.token_ids)) >= 10 for r in refs), [r.token_ids for r in refs]
    assert len({tuple(r.token_ids) for r in refs}) == len(refs)

    with LLM(str(checkpoint(name)), block_size=8, kv_cache_memory="2MiB", max_model_len=128) as llm:
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert_matches_reference(outputs, refs, prompts)
        assert_all_blocks_free(llm.engine)


# ------------------------------------------------------------------------------------------- scheduling paths


@dataclass
class Trace:
    """What the engine did while generating: every scheduled step and every successful allocation."""

    steps: list[SchedulerOutput] = field(default_factory=list)
    # (seq_id, preemptions so far, reused blocks) for every allocate() that succeeded
    allocations: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def readmitted_onto_cache(self) -> list[tuple[int, int, int]]:
        return [a for a in self.allocations if a[1] > 0 and a[2] > 0]


def traced_llm(path: str, **options: Any) -> tuple[LLM, Trace]:
    """An LLM whose scheduler decisions and block allocations are recorded (the originals still run)."""
    llm = LLM(path, block_size=BLOCK_SIZE, **options)
    trace = Trace()
    scheduler, bm = llm.engine.scheduler, llm.engine.block_manager
    schedule, allocate = scheduler.schedule, bm.allocate

    def traced_schedule() -> SchedulerOutput:
        out = schedule()
        trace.steps.append(out)
        return out

    def traced_allocate(seq: Any, reused: list[int], num_new_tokens: int) -> bool:
        preemptions = seq.num_preemptions
        ok = allocate(seq, reused, num_new_tokens)
        if ok:
            trace.allocations.append((seq.seq_id, preemptions, len(reused)))
        return ok

    scheduler.schedule = traced_schedule  # type: ignore[method-assign]
    bm.allocate = traced_allocate  # type: ignore[method-assign]
    return llm, trace


def bytes_per_block(path: str) -> int:
    with LLM(path, block_size=BLOCK_SIZE, kv_cache_memory="1MiB", max_model_len=64) as probe:
        return int(probe.kv_cache_info()["bytes_per_block"][0])


@pytest.mark.parametrize("name", SCENARIO_ARCHS)
def test_chunked_prefill(name: str, checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    budget = 16
    prompts = make_prompts(vocab_size_of(name), 6, seed=11, min_len=budget + 1, max_len=60)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    llm, trace = traced_llm(str(checkpoint(name)), max_num_batched_tokens=budget, max_model_len=96, kv_cache_memory="2MiB")
    with llm:
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert_matches_reference(outputs, refs, prompts)
        assert_all_blocks_free(llm.engine)
    assert all(step.num_batched_tokens <= budget for step in trace.steps)
    # Prompts longer than the budget were split: some chunks ended before the prompt did ...
    assert any(not c.sample for step in trace.steps for c in step.chunks)
    # ... and later chunks started mid-prompt on top of KV written by an earlier step.
    assert any(c.start > 0 and len(c.token_ids) > 1 for step in trace.steps for c in step.chunks)


@pytest.mark.parametrize("name", SCENARIO_ARCHS)
def test_no_chunking_prefills_whole_prompts(name: str, checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    prompts = make_prompts(vocab_size_of(name), 6, seed=11, min_len=17, max_len=60)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    llm, trace = traced_llm(
        str(checkpoint(name)), enable_chunked_prefill=False, max_num_batched_tokens=96, max_model_len=96,
        kv_cache_memory="2MiB",
    )  # fmt: skip
    with llm:
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert_matches_reference(outputs, refs, prompts)
        assert_all_blocks_free(llm.engine)
    assert all(c.sample for step in trace.steps for c in step.chunks), "a prompt was split without chunking"
    assert max(step.num_batched_tokens for step in trace.steps) > 16


@pytest.mark.parametrize(
    "name, chunked, prefix_caching",
    [
        ("qwen3-gqa", True, True),
        ("qwen3-gqa", False, True),
        ("qwen3-gqa", True, False),
        ("qwen3-gqa", False, False),
        ("qwen2-mqa-bias", True, True),
    ],
    ids=["chunked-cache", "unchunked-cache", "chunked-nocache", "unchunked-nocache", "qwen2-chunked-cache"],
)
def test_prefix_cache_hits(
    name: str, chunked: bool, prefix_caching: bool, checkpoint: CheckpointCache, hf_reference: ReferenceCache
) -> None:
    """Same tokens with prefix caching on and off, chunking on and off; with caching on, the hits are real."""
    vocab = vocab_size_of(name)
    rng = random.Random(5)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(FIRST_PLAIN_TOKEN, vocab) for _ in range(n)]

    system = tokens(6 * BLOCK_SIZE)  # 24 tokens: 6 full blocks
    warmup = [system + tokens(7)]  # caches all 6 blocks of `system` (and one more)
    batch = [
        system,  # fully covered by cached blocks, length a multiple of block_size: the hard case
        system + tokens(9),  # shared prefix
        tokens(21),  # unrelated
        system[: 3 * BLOCK_SIZE] + tokens(5),  # shares only the first 3 blocks
        warmup[0],  # exact repeat of an earlier prompt
        tokens(2),
        system + tokens(9),
    ]
    batch.append(list(batch[1]))  # exact repeat inside one batch
    refs = hf_reference(name, warmup + batch, MAX_TOKENS)
    budget = 16 if chunked else 96
    llm, trace = traced_llm(
        str(checkpoint(name)), enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked,
        max_num_batched_tokens=budget, max_model_len=96, kv_cache_memory="2MiB",
    )  # fmt: skip
    with llm:
        engine = llm.engine
        first = llm.generate(token_prompts(warmup), GREEDY, use_tqdm=False)
        assert_matches_reference(first, refs[:1], warmup)
        assert first[0].num_cached_tokens == 0
        assert_all_blocks_free(engine)

        outputs = llm.generate(token_prompts(batch), GREEDY, use_tqdm=False)
        assert_matches_reference(outputs, refs[1:], batch)
        assert_all_blocks_free(engine)
        stats = engine.block_manager.stats

    cached = [o.num_cached_tokens for o in outputs]
    if not prefix_caching:
        assert stats.hits == 0 and cached == [0] * len(batch)
        return
    assert stats.hits > 0 and stats.hits == sum(cached)
    # The fully cached prompt reuses blocks, yet its last token is recomputed (it has to produce logits):
    # at most the blocks before the last one come from the cache.
    assert len(system) - BLOCK_SIZE <= cached[0] < len(system)
    assert cached[1] >= len(system)  # the shared system prompt
    assert cached[3] == 3 * BLOCK_SIZE  # exactly the 3 shared blocks, not the diverging 4th
    assert cached[4] >= len(system)  # the repeat of the warm-up prompt
    assert cached[2] == cached[5] == 0  # nothing to share
    assert cached[7] >= len(system)  # the in-batch repeat


@pytest.mark.parametrize(
    "name, chunked",
    [("qwen3-gqa", True), ("qwen3-gqa", False), ("qwen2-mqa-bias", True)],
    ids=["chunked", "unchunked", "qwen2-chunked"],
)
def test_preemption(name: str, chunked: bool, checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    """A KV budget far too small for the batch: requests are preempted and recomputed, and a preempted request
    comes back onto its own cached blocks. Tokens still equal transformers'."""
    path = str(checkpoint(name))
    max_model_len = 64
    num_blocks = 20  # one max_model_len sequence needs 16; the batch below needs ~75
    prompts = make_prompts(vocab_size_of(name), 6, seed=21, min_len=20, max_len=40)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    llm, trace = traced_llm(
        path, kv_cache_memory=num_blocks * bytes_per_block(path), max_model_len=max_model_len,
        enable_chunked_prefill=chunked, max_num_batched_tokens=16 if chunked else max_model_len,
    )  # fmt: skip
    with llm:
        engine = llm.engine
        assert engine.block_manager.num_blocks == num_blocks
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert_matches_reference(outputs, refs, prompts)
        assert_all_blocks_free(engine)
        assert engine.scheduler.num_preemptions > 0
    # A preempted request re-admitted with blocks from the prefix cache: KV it had computed before being
    # preempted (prompt and generated tokens) is reused instead of recomputed.
    assert trace.readmitted_onto_cache, trace.allocations


def test_preempted_request_comes_back_onto_its_generated_tokens(
    checkpoint: CheckpointCache, hf_reference: ReferenceCache
) -> None:
    """Two long requests that cannot both fit: the newer is preempted mid-decode, comes back, and finds its
    prompt *and* part of its generated tokens in the prefix cache; tokens equal transformers' for both."""
    name = "qwen3-gqa"
    path = str(checkpoint(name))
    prompts = make_prompts(vocab_size_of(name), 2, seed=4, min_len=32, max_len=32)
    refs = hf_reference(name, prompts, 30)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=30, logprobs=0)
    # Each request peaks at 62 tokens = 16 blocks; 28 blocks cannot hold both, but once the victim is out
    # the survivor takes only a few of its freed blocks (tail first), so most of the victim stays cached.
    llm, trace = traced_llm(path, kv_cache_memory=28 * bytes_per_block(path), max_model_len=80)
    with llm:
        outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
        assert_matches_reference(outputs, refs, prompts)
        assert_all_blocks_free(llm.engine)
        assert llm.engine.scheduler.num_preemptions > 0
    readmitted = trace.readmitted_onto_cache
    assert readmitted, trace.allocations
    # More tokens came from the cache than the prompt has: KV of generated tokens was reused, not recomputed.
    assert max(reused for _, _, reused in readmitted) * BLOCK_SIZE > len(prompts[1]), readmitted


def test_everything_at_once(checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    """Chunked prefill + prefix caching + preemption + mixed lengths in one batch, over several calls."""
    name = "llama-gqa"
    path = str(checkpoint(name))
    vocab = vocab_size_of(name)
    rng = random.Random(8)
    system = [rng.randrange(FIRST_PLAIN_TOKEN, vocab) for _ in range(2 * BLOCK_SIZE)]
    prompts = [system + p for p in make_prompts(vocab, 5, seed=9, min_len=1, max_len=30)]
    prompts += make_prompts(vocab, 3, seed=10, min_len=1, max_len=30)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    llm, trace = traced_llm(path, kv_cache_memory=18 * bytes_per_block(path), max_model_len=64, max_num_batched_tokens=12)
    with llm:
        for _ in range(2):  # the second round starts with a warm prefix cache
            outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
            assert_matches_reference(outputs, refs, prompts)
            assert_all_blocks_free(llm.engine)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.stats.hits > 0
    assert any(not c.sample for step in trace.steps for c in step.chunks)


def test_kv_cache_memory_accepts_bytes_and_strings(checkpoint: CheckpointCache) -> None:
    path = str(checkpoint("qwen3-gqa"))
    per_block = bytes_per_block(path)
    sizes: list[int] = []
    for memory in (64 * 1024, "64KiB", "0.0625MiB", " 64 kib "):
        with LLM(path, block_size=BLOCK_SIZE, kv_cache_memory=memory, max_model_len=32) as llm:
            sizes.append(llm.engine.block_manager.num_blocks)
    assert sizes == [64 * 1024 // per_block] * 4


def test_unwritten_cache_slots_are_never_read(checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    """The KV cache is allocated uninitialised (``torch.empty``), so a slot nobody wrote may hold any bit
    pattern, NaN and Inf included. Attention must not let such a slot reach the output: masking a score to
    -inf is not enough when the key is NaN (NaN + -inf = NaN) or the value is (0 * NaN = NaN).

    Poison every slot with NaN before generating; then decode (partly filled last blocks), chunked prefill
    over cached context and prefix-cache hits all run over poisoned neighbours."""
    name = "qwen3-gqa"
    vocab = vocab_size_of(name)
    system = make_prompts(vocab, 1, seed=31, min_len=2 * BLOCK_SIZE, max_len=2 * BLOCK_SIZE)[0]
    prompts = [system + p for p in make_prompts(vocab, 4, seed=32, min_len=1, max_len=30)]
    refs = hf_reference(name, prompts, MAX_TOKENS)
    llm, _ = traced_llm(str(checkpoint(name)), max_num_batched_tokens=16, max_model_len=96, kv_cache_memory="256KiB")
    with llm:
        for layer in llm.engine.executor.runner.attention_layers:
            layer.kv_cache.fill_(float("nan"))
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert_matches_reference(outputs, refs, prompts)
        assert llm.engine.block_manager.stats.hits > 0
        assert_all_blocks_free(llm.engine)
