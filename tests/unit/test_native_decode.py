"""The decoder's decode steps in one C call (models/native_decode.py) against the per-layer path.

The C loop runs the same kernels in the same order as the layers do from Python, so tokens and
log-probabilities must be *identical*, not close: any difference means it skipped, reordered or misread
something. Each case checks that the C loop really ran (its step counter), with several sequences decoding at
once (rows > 1), a shared prefix served from the prefix cache, and chunked prefill mixed in; the model-level
parity tests against transformers (tests/model/) run through it too, since it is the default.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.layers.native import load as load_kernels
from nanoserve.models import native_decode
from nanoserve.testing.checkpoints import build_checkpoint
from tests.conftest import assert_all_blocks_free

PREFIX = [7, 19, 23, 31, 44, 58, 61, 77]
PROMPTS = [PREFIX + [120, 133, 141], PREFIX + [150, 162, 170, 181, 190, 201, 215, 222, 230], [5 + 7 * i for i in range(30)]]
SAMPLING = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, logprobs=3)
ENGINE = dict(kv_cache_memory="32MiB", block_size=4, max_num_batched_tokens=16, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("native_decode")
    return {
        # Qwen3: per-head q/k norms; GQA 4:2.
        "qwen3": build_checkpoint(root / "qwen3", arch="qwen3", hidden_size=64, num_key_value_heads=2, seed=21),
        # Qwen2: q/k/v biases, no q/k norms.
        "qwen2": build_checkpoint(root / "qwen2", arch="qwen2", hidden_size=64, num_key_value_heads=2, seed=22),
        # Llama, tied embeddings, three layers.
        "llama": build_checkpoint(root / "llama", arch="llama", tie_word_embeddings=True, num_hidden_layers=3, seed=23),
    }


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Intra-op threads for an in-process engine (the suite runs at 1): the C step shares each kernel's work
    between its threads, so the comparisons run it on two against the layer path on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(model: pathlib.Path, native: bool, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> tuple[list, list, int]:
    """Tokens and top log-probabilities of PROMPTS, and how many steps took the C loop (on two threads; the
    layer path on one)."""
    monkeypatch.setenv(native_decode.NATIVE_DECODE_ENV, "1" if native else "0")
    with _threads(2 if native else 1), LLM(str(model), **ENGINE, **kwargs) as llm:
        first = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SAMPLING, use_tqdm=False)
        rest = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[1:]], SAMPLING, use_tqdm=False)
        outs = first + rest
        assert sum(o.num_cached_tokens for o in rest) >= 4, "the shared prefix was not served from the cache"
        assert_all_blocks_free(llm.engine)
        plan = llm.engine.executor.runner.model.model.native_decode
        steps = plan.steps_run if plan is not None else 0
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[sorted(d.items()) for d in o.outputs[0].logprobs] for o in outs]
    return tokens, logprobs, steps


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("qwen3", {}),
        ("qwen2", {}),
        ("llama", {}),
        ("qwen3", dict(quantization="int4", quantization_group_size=32)),
        ("qwen2", dict(quantization="int4", quantization_group_size=32, quantization_zero_point=True)),
        ("llama", dict(quantization="int8")),
        ("qwen3", dict(quantization="int8", quantization_activations="int8")),
        ("qwen2", dict(quantization="int4", quantization_group_size=32, quantization_activations="int8")),
        ("llama", dict(quantization="int4", quantization_group_size=32, quantization_activations="int8")),
        ("qwen3", dict(kv_cache_dtype="float16")),
        ("llama", dict(quantization="int4", quantization_group_size=32, kv_cache_dtype="float16")),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "fp32",
)
def test_identical_to_the_layer_path(
    checkpoints: dict[str, pathlib.Path], arch: str, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    if kwargs.get("kv_cache_dtype") == "float16" and not getattr(load_kernels(), "kv_half", False):
        pytest.skip("no C kernels for float16 caches here (no compiler or no F16C): the C loop declines")
    tokens, logprobs, steps = _run(checkpoints[arch], True, monkeypatch, **kwargs)
    want_tokens, want_logprobs, off_steps = _run(checkpoints[arch], False, monkeypatch, **kwargs)
    assert off_steps == 0
    # 12 tokens for one sequence, then two decoding together: at least 20 decode-only steps.
    assert steps >= 20, f"the C loop ran {steps} steps"
    assert len({t for seq in want_tokens for t in seq}) >= 8, want_tokens  # the comparison is not blind
    assert tokens == want_tokens
    assert logprobs == want_logprobs


def test_torch_attention_backend_keeps_the_layer_path(checkpoints: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # The C loop calls the native attention kernel; a model configured for torch's attention must not take it.
    monkeypatch.setenv("NANOSERVE_ATTENTION_BACKEND", "torch_sdpa")
    _, _, steps = _run(checkpoints["qwen3"], True, monkeypatch)
    assert steps == 0


def test_native_kernels_off_keeps_the_torch_path(checkpoints: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # NANOSERVE_NATIVE=0 selects torch ops and torch's attention everywhere; the C loop must not run behind it.
    monkeypatch.setenv("NANOSERVE_NATIVE", "0")
    _, _, steps = _run(checkpoints["qwen3"], True, monkeypatch)
    assert steps == 0


def test_row_limits_of_float_activation_lowbit_layers(checkpoints: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """From 16 rows on, float-activation low-bit layers widen their weights for a float GEMM: a decode batch that
    large must take the layer path (where that happens), and a smaller one the C loop."""
    monkeypatch.setenv(native_decode.NATIVE_DECODE_ENV, "1")
    prompts = [{"prompt_token_ids": [3 + i, 40 + i, 90 + i]} for i in range(20)]
    sampling = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4)
    with LLM(str(checkpoints["llama"]), kv_cache_memory="32MiB", block_size=4, quantization="int8") as llm:
        model = llm.engine.executor.runner.model.model
        llm.generate(prompts, sampling, use_tqdm=False)  # 20 rows per decode step
        assert model.native_decode is not None and model.native_decode.max_rows == 15
        assert model.native_decode.steps_run == 0
        llm.generate(prompts[:3], sampling, use_tqdm=False)
        assert model.native_decode.steps_run == 3


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(quantization="int8", quantization_activations="int8"),
     dict(quantization="int4", quantization_group_size=32, quantization_activations="int8")],
    ids=["fp32", "int8-a8", "int4-a8"],
)  # fmt: skip
def test_many_rows_identical_to_the_layer_path(
    checkpoints: dict[str, pathlib.Path], kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve sequences decoding together: the C step's threads then round x to int8 together (from 8 rows)
    instead of each on its own, and the float32 projections take their several-row kernel."""
    prompts = [{"prompt_token_ids": [5 + 3 * i, 60 + 7 * i, 99 + i, 140 - i]} for i in range(12)]
    sampling = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6, logprobs=2)
    results = []
    for native in (True, False):
        monkeypatch.setenv(native_decode.NATIVE_DECODE_ENV, "1" if native else "0")
        with _threads(2 if native else 1), LLM(str(checkpoints["qwen3"]), kv_cache_memory="32MiB", block_size=4, **kwargs) as llm:
            outs = llm.generate(prompts, sampling, use_tqdm=False)
            assert_all_blocks_free(llm.engine)
            plan = llm.engine.executor.runner.model.model.native_decode
            steps = plan.steps_run if plan is not None else 0
        assert steps >= 5 if native else steps == 0
        results.append([(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs])
    assert len({t for seq, _ in results[1] for t in seq}) >= 8  # the comparison is not blind
    assert results[0] == results[1]


def test_rebound_caches_get_a_new_plan(checkpoints: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan holds the caches' addresses: after the runner binds new cache tensors (another block count, so
    the V halves move too) the next decode step plans again, and its outputs are those of a fresh engine."""
    monkeypatch.setenv(native_decode.NATIVE_DECODE_ENV, "1")
    prompt = [{"prompt_token_ids": PROMPTS[2]}]
    # No prefix cache: the new tensors hold none of what the old ones cached.
    with _threads(2), LLM(str(checkpoints["qwen3"]), **{**ENGINE, "enable_prefix_caching": False}) as llm:
        runner = llm.engine.executor.runner
        want = llm.generate(prompt, SAMPLING, use_tqdm=False)[0].outputs[0].token_ids
        first = runner.model.model.native_decode
        assert first is not None and first.steps_run >= 10
        runner.allocate_kv_cache(runner.num_blocks - 3)  # the scheduler's blocks stay valid: fewer ids, none new
        got = llm.generate(prompt, SAMPLING, use_tqdm=False)[0].outputs[0].token_ids
        plan = runner.model.model.native_decode
        assert plan is not first and plan.steps_run >= 10
        caches = [layer.self_attn.attn.kv_cache for layer in runner.model.model.layers]
        assert [(d.k_cache, d.v_cache) for d in plan.layers] == [
            (c.data_ptr(), c.data_ptr() + c[0].numel() * c.element_size()) for c in caches
        ]
        assert got == want


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("qwen3", {}),
        ("llama", {}),  # tied embeddings
        ("qwen2", dict(quantization="int4", quantization_group_size=32)),  # float activations, an int8 LM head
        ("qwen3", dict(quantization="int8", quantization_activations="int8")),
        ("llama", dict(quantization="int4", quantization_group_size=32, quantization_activations="int8",
                       kv_cache_dtype="float16")),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "fp32",
)  # fmt: skip
def test_greedy_steps_take_their_tokens_from_the_c_step(
    checkpoints: dict[str, pathlib.Path], arch: str, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain greedy requests (no log-probabilities, penalties or grammar) get their tokens from the C step, which
    runs the final norm, the LM head and the argmax itself: the same tokens as the layer path, whose logits go
    through the sampler; with prefix caching, chunked prefill and several rows, and the blocks all returned."""
    if kwargs.get("kv_cache_dtype") == "float16" and not getattr(load_kernels(), "kv_half", False):
        pytest.skip("no C kernels for float16 caches here (no compiler or no F16C): the C loop declines")
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12)
    results = []
    for native in (True, False):
        monkeypatch.setenv(native_decode.NATIVE_DECODE_ENV, "1" if native else "0")
        with _threads(2 if native else 1), LLM(str(checkpoints[arch]), **ENGINE, **kwargs) as llm:
            first = llm.generate([{"prompt_token_ids": PROMPTS[0]}], greedy, use_tqdm=False)
            rest = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[1:]], greedy, use_tqdm=False)
            assert sum(o.num_cached_tokens for o in rest) >= 4, "the shared prefix was not served from the cache"
            assert_all_blocks_free(llm.engine)
            plan = llm.engine.executor.runner.model.model.native_decode
            if native:
                assert plan is not None and plan.greedy_steps_run >= 20 and plan.greedy_steps_run == plan.steps_run
        results.append([o.outputs[0].token_ids for o in first + rest])
    assert len({t for seq in results[1] for t in seq}) >= 8, results[1]  # the comparison is not blind
    assert results[0] == results[1]


def test_a_step_that_needs_logits_keeps_the_sampler(checkpoints: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A request asking for log-probabilities beside a plain greedy one: the steps they share go through the
    logits and the sampler (log-probabilities as the layer path gives them), the greedy one's later steps through
    the C step's argmax; the tokens of both are the layer path's."""
    prompts = [{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[2]}]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=12),
              SamplingParams(temperature=0, ignore_eos=True, max_tokens=4, logprobs=2)]  # fmt: skip
    results = []
    for native in (True, False):
        monkeypatch.setenv(native_decode.NATIVE_DECODE_ENV, "1" if native else "0")
        with _threads(2 if native else 1), LLM(str(checkpoints["qwen3"]), **ENGINE) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            plan = llm.engine.executor.runner.model.model.native_decode
            if native:
                # 11 decode steps for the first request, 3 of them beside the second's
                assert plan is not None and 0 < plan.greedy_steps_run < plan.steps_run
        results.append([(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs or []]) for o in outs])
    assert results[1][1][1], "the second request has log-probabilities"
    assert results[0] == results[1]
