"""``kv_cache_dtype="float16"``: a float32 model whose KV cache stores halves (CPU).

What must hold: the cache holds twice the blocks for the same budget (and ``nanoserve plan`` predicts that);
what it stores is exactly torch's float16 rounding of the float32 keys and values; the C kernels (store,
decode attention, the one-call decode loop) and the pure-torch path compute the same thing on those rounded
values; and the output stays close to the float32 cache's (it cannot be equal: every later step reads
rounded keys).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.layers import native
from nanoserve.tools.plan import make_plan
from tests.conftest import assert_all_blocks_free, make_prompts, token_prompts, vocab_size_of

NAME = "qwen3-gqa"  # q/k norms, GQA, head_dim decoupled from hidden / heads
ENGINE = dict(kv_cache_memory="2MiB", block_size=4, max_model_len=160, max_num_batched_tokens=24)


def _generate(model: str, prompts: list[list[int]], params: SamplingParams, **options: Any) -> tuple[list, int]:
    with LLM(model, **ENGINE, **options) as llm:
        # A shared prefix: the second wave reads cached blocks (prefill attention over rounded keys).
        outs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
        outs += llm.generate(token_prompts([prompts[0][:20] + [9, 8, 7]]), params, use_tqdm=False)
        assert outs[-1].num_cached_tokens >= 16
        assert_all_blocks_free(llm.engine)
        blocks = llm.engine.executor.runner.num_blocks
    return outs, blocks


def _half_kernels() -> bool:
    lib = native.load()
    return lib is not None and lib.kv_half


@pytest.mark.skipif(not _half_kernels(), reason="no C kernels for float16 caches here (no compiler or no F16C)")
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


def _cached_prompt(model: str, prompt: list[int], **options: Any) -> list[torch.Tensor]:
    """Every layer's cached K and V of ``prompt`` after its prefill (and one decode step)."""
    with LLM(model, **{**ENGINE, "enable_prefix_caching": False, **options}) as llm:
        manager = llm.engine.scheduler.block_manager
        seen: dict[str, list[int]] = {}
        real_free = manager.free

        def free_after_noting_blocks(seq: Any) -> None:
            seen.setdefault("blocks", list(seq.block_ids))
            real_free(seq)

        manager.free = free_after_noting_blocks  # the sequence's blocks, before they are released
        llm.generate(token_prompts([prompt]), SamplingParams(temperature=0, ignore_eos=True, max_tokens=1), use_tqdm=False)
        index = torch.tensor(seen["blocks"])
        layers = llm.engine.executor.runner.attention_layers
        return [layer.kv_cache[:, index].flatten(1, 2)[:, : len(prompt)].clone() for layer in layers]


def test_prefill_stores_the_rounded_keys_and_values_however_it_is_chunked(checkpoint) -> None:
    """The first layer's cache holds exactly the float32 cache's keys and values rounded (its inputs do not
    depend on the cache). Later layers differ from the float32 run, because a prompt's own fresh keys are
    rounded as cached ones are; so a prompt prefilled in one chunk caches what it caches prefilled in chunks of
    8, up to summation order (a float32 ulp can tip a value to the neighbouring half): the output does not
    depend on how the scheduler split the prompt."""
    model = str(checkpoint(NAME))
    (prompt,) = make_prompts(vocab_size_of(NAME), 1, seed=9, min_len=30, max_len=30)
    full = _cached_prompt(model, prompt, max_num_batched_tokens=64)
    whole = _cached_prompt(model, prompt, max_num_batched_tokens=64, kv_cache_dtype="float16")
    chunked = _cached_prompt(model, prompt, max_num_batched_tokens=8, kv_cache_dtype="float16")
    assert whole[0].dtype == torch.float16 and full[0].abs().sum() > 0
    assert torch.equal(whole[0], full[0].half())
    assert not torch.equal(whole[-1], full[-1].half()), "later layers read rounded keys: they must differ"
    for i, (a, b) in enumerate(zip(whole, chunked)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=1e-3, msg=f"layer {i}")


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


def test_refused_on_cuda_and_for_half_models() -> None:
    from nanoserve.config import resolve_kv_cache_dtype

    with pytest.raises(ValueError, match="applies to float32 models on the CPU"):
        resolve_kv_cache_dtype("float16", torch.float32, "cuda")
    assert resolve_kv_cache_dtype("float16", torch.float16, "cuda") == torch.float16  # the model's own: auto
    assert resolve_kv_cache_dtype("half", torch.float32, "cpu") == torch.float16


def test_verify_reports_the_cache_and_allows_its_near_ties(checkpoint) -> None:
    from nanoserve.tools.verify import run_verify

    report = run_verify(str(checkpoint(NAME)), max_tokens=8, progress=False, kv_cache_dtype="float16")
    assert report.settings["kv_cache_dtype"] == "float16" and "kv_cache_dtype=float16" in report.format_text()
    assert report.tie_tolerance == 0.1  # float16's, not float32's 0.01
