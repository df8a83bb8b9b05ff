"""``kv_cache_dtype="float16"``: a float32 model whose KV cache stores halves (CPU).

What must hold: the cache holds twice the blocks for the same budget (and ``nanoserve plan`` predicts that);
what it stores is exactly torch's float16 rounding of the float32 keys and values; the C kernels (store,
decode attention, the one-call decode loop) and the pure-torch path compute the same thing on those rounded
values; and the output stays close to the float32 cache's (it cannot be equal: every later step reads
rounded keys).
"""

from __future__ import annotations

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.layers import native
from nanoserve.tools.plan import make_plan
from tests.conftest import assert_all_blocks_free, make_prompts, token_prompts, vocab_size_of

NAME = "qwen3-gqa"  # q/k norms, GQA, head_dim decoupled from hidden / heads
ENGINE = dict(kv_cache_memory="2MiB", block_size=4, max_model_len=160, max_num_batched_tokens=24)


def _generate(model: str, prompts: list[list[int]], params: SamplingParams, **options) -> tuple[list, int]:
    with LLM(model, **ENGINE, **options) as llm:
        # A shared prefix: the second wave reads cached blocks (prefill attention over rounded keys).
        outs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
        outs += llm.generate(token_prompts([prompts[0][:20] + [9, 8, 7]]), params, use_tqdm=False)
        assert outs[-1].num_cached_tokens >= 16
        assert_all_blocks_free(llm.engine)
        blocks = llm.engine.executor.runner.num_blocks
    return outs, blocks


def test_half_cache_c_and_torch_paths_agree_and_hold_twice_the_blocks(checkpoint, monkeypatch) -> None:
    model = str(checkpoint(NAME))
    prompts = make_prompts(vocab_size_of(NAME), 4, seed=5, min_len=24, max_len=70)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=16, logprobs=0)
    full, full_blocks = _generate(model, prompts, params)
    half, half_blocks = _generate(model, prompts, params, kv_cache_dtype="float16")
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    monkeypatch.setenv("NANOSERVE_ATTENTION_BACKEND", "torch_sdpa")
    torch_half, _ = _generate(model, prompts, params, kv_cache_dtype="float16")

    assert half_blocks in (2 * full_blocks, 2 * full_blocks + 1)  # budget // (bytes per block / 2)
    tokens = [o.outputs[0].token_ids for o in full]
    assert len({t for seq in tokens for t in seq}) >= 8, "the comparison is not blind"
    # The same arithmetic on rounded values, up to summation order: the same greedy tokens. Log-probabilities
    # agree less tightly than with a float32 cache: a key that differs by one float32 ulp between the paths
    # can round to neighbouring halves, 2^-11 apart.
    for a, b in zip(half, torch_half):
        (x,), (y,) = a.outputs, b.outputs
        assert x.token_ids == y.token_ids
        for lx, ly, t in zip(x.logprobs, y.logprobs, x.token_ids):
            assert lx[t].logprob == pytest.approx(ly[t].logprob, abs=5e-3)
    # Against the float32 cache: close, not equal (a rounded key moves a score by ~1e-3 of its size).
    agree = sum(a == b for x, y in zip(half, full) for a, b in zip(x.outputs[0].token_ids, y.outputs[0].token_ids))
    assert agree >= 0.8 * sum(len(t) for t in tokens), f"{agree} of {sum(len(t) for t in tokens)} tokens agree"


def test_prefill_stores_exactly_the_rounded_float32_keys_and_values(checkpoint) -> None:
    """A prompt with nothing cached attends to its own fresh (unrounded) keys, so every layer sees the same
    inputs as with a float32 cache, and the half cache must hold exactly those keys and values rounded."""
    model = str(checkpoint(NAME))
    (prompt,) = make_prompts(vocab_size_of(NAME), 1, seed=9, min_len=30, max_len=30)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=1)
    caches = {}
    for dtype in ("auto", "float16"):
        with LLM(model, **{**ENGINE, "max_num_batched_tokens": 64}, kv_cache_dtype=dtype, enable_prefix_caching=False) as llm:
            runner = llm.engine.executor.runner
            seen = {}
            real_free = llm.engine.scheduler.block_manager.free

            def keep_table(seq, real_free=real_free, seen=seen):  # the blocks before they are released
                seen.setdefault("blocks", list(seq.block_ids))
                return real_free(seq)

            llm.engine.scheduler.block_manager.free = keep_table
            llm.generate(token_prompts([prompt]), params, use_tqdm=False)
            index = torch.tensor(seen["blocks"])
            caches[dtype] = [layer.kv_cache[:, index].flatten(1, 2)[:, : len(prompt)].clone() for layer in runner.attention_layers]
    assert all(c.dtype == torch.float16 for c in caches["float16"])
    for i, (full, half) in enumerate(zip(caches["auto"], caches["float16"])):
        assert full.abs().sum() > 0, f"layer {i}: nothing was stored"
        assert torch.equal(half, full.half()), f"layer {i}"


def test_plan_counts_half_bytes_per_block(checkpoint) -> None:
    model = str(checkpoint(NAME))
    full = make_plan(model, kv_cache_memory="2MiB", block_size=4)
    half = make_plan(model, kv_cache_memory="2MiB", block_size=4, kv_cache_dtype="fp16")
    assert half.kv_cache_dtype == "float16" and full.kv_cache_dtype == "float32"
    assert 2 * half.ranks[0].kv_bytes_per_block == full.ranks[0].kv_bytes_per_block
    assert half.num_blocks in (2 * full.num_blocks, 2 * full.num_blocks + 1)
    with LLM(model, **ENGINE, kv_cache_dtype="float16") as llm:
        assert llm.engine.executor.runner.kv_bytes_per_block == half.ranks[0].kv_bytes_per_block


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype: unsupported 'fp8'; choose one of auto, float16"),
        (dict(kv_cache_dtype="float16", dtype="bfloat16"), "applies to float32 models on the CPU"),
    ],
)
def test_bad_kv_cache_dtype_is_refused(checkpoint, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig.create(str(checkpoint(NAME)), **options)
