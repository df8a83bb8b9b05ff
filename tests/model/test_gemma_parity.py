"""Gemma 2, Gemma 3 and the text model of a Gemma 3 vision-language checkpoint against transformers, token for
token in float32: prompts and outputs well past the window of 8 of the local layers, prefill in chunks,
prefix-cache hits, preemption, on the C kernels and on pure torch. The every-architecture test of
test_parity.py runs them too (whole prompts, no preemption)."""

from __future__ import annotations

import logging

import pytest

from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS, build_checkpoint
from tests.conftest import (
    CheckpointCache,
    ReferenceCache,
    assert_all_blocks_free,
    make_prompts,
    token_prompts,
    vocab_size_of,
)
from tests.model.test_parity import assert_matches_reference, bytes_per_block, traced_llm

WINDOW = 8
MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS, logprobs=0)
GEMMA = ["gemma2", "gemma3", "gemma3-vl"]


def scenario_prompts(name: str) -> list[list[int]]:
    vocab = vocab_size_of(name)
    shared = make_prompts(vocab, 1, seed=7, min_len=13, max_len=13)[0]
    prompts = make_prompts(vocab, 4, seed=5, min_len=9, max_len=48)
    return prompts + [shared + p for p in make_prompts(vocab, 2, seed=6, min_len=3, max_len=12)]


def assert_reference_varies(refs: list) -> None:
    """Soft-capping and small weights could leave a random model near-constant; then parity proves little."""
    assert len({tuple(r.token_ids) for r in refs}) == len(refs)
    assert sum(len(set(r.token_ids)) for r in refs) >= 6 * len(refs), [r.token_ids for r in refs]


@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "torch"])
@pytest.mark.parametrize("name", GEMMA)
def test_gemma_parity_through_chunks_cache_hits_and_preemption(
    name: str, native: bool, checkpoint: CheckpointCache, hf_reference: ReferenceCache, monkeypatch
) -> None:
    if not native:
        monkeypatch.setenv("NANOSERVE_NATIVE", "0")
    assert DEFAULT_ARCH_CONFIGS[name]["extra_config"]["sliding_window"] == WINDOW
    path = str(checkpoint(name))
    prompts = scenario_prompts(name)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    assert_reference_varies(refs)
    # 22 blocks of 4: one 80-token sequence fits, the batch (~90 blocks at its peak) does not: preemption. At
    # most 12 tokens a step: long prompts are prefilled in pieces, whose queries see the keys of the piece
    # before (and, past the window, not all of them).
    llm, trace = traced_llm(path, kv_cache_memory=22 * bytes_per_block(path), max_model_len=80,
                            max_num_batched_tokens=12)  # fmt: skip
    with llm:
        model = llm.engine.executor.runner.model
        assert [a.sliding_window for a in model.attention_layers()] == [
            WINDOW if t == "sliding_attention" else 0 for t in DEFAULT_ARCH_CONFIGS[name]["extra_config"]["layer_types"]
        ]
        for _ in range(2):  # the second round starts with a warm prefix cache
            outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
            assert_matches_reference(outputs, refs, prompts)
            assert_all_blocks_free(llm.engine)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.stats.hits > 0
        assert model.model.native_decode is None  # the C decode loop declines Gemma: the per-layer path ran
    assert trace.readmitted_onto_cache, "no preempted request came back onto cached blocks"
    continued = [c for step in trace.steps for c in step.chunks if len(c.token_ids) > 1 and c.start > WINDOW]
    assert continued, "no prompt was prefilled in pieces past the window"


def test_vision_language_checkpoint_runs_its_text_model(
    checkpoint: CheckpointCache, hf_reference: ReferenceCache, tmp_path, caplog
) -> None:
    """Gemma3ForConditionalGeneration: the engine reads its text_config; text tensors load under either naming
    (the hub's ``language_model.model.*``, transformers 5's in-memory ``model.language_model.*``); the vision
    tower and the projector are skipped with one log line that names them."""
    name = "gemma3-vl"
    hub = checkpoint(name)
    renamed = build_checkpoint(tmp_path / "v5-names", **DEFAULT_ARCH_CONFIGS[name], transformers5_names=True)
    config = EngineConfig.create(str(renamed))
    assert config.hf_config.architectures == ["Gemma3ForConditionalGeneration"]
    assert config.hf_config.model_type == "gemma3_text" and config.hf_config.hidden_size == 64

    prompts = make_prompts(vocab_size_of(name), 3, seed=40, min_len=10, max_len=30)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    for path in (hub, renamed):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nanoserve.models.loader"):
            with LLM(str(path), block_size=4, kv_cache_memory="1MiB", max_model_len=64) as llm:
                outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert_matches_reference(outputs, refs, prompts)
        (line,) = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
        assert "vision_tower" in line and "multi_modal_projector" in line, line


@pytest.mark.parametrize("name", ["gemma2", "gemma3-vl"])
def test_quantized_gemma_matches_transformers_on_the_widened_weights(name: str, checkpoint: CheckpointCache, tmp_path) -> None:
    """int8 on load (the LM head included): transformers running the weights as nanoserve widens them; for the
    vision-language checkpoint the widened text tensors go back under the checkpoint's own names."""
    from nanoserve.quantization.export import write_dequantized_checkpoint
    from nanoserve.testing.reference import hf_greedy

    path = checkpoint(name)
    prompts = scenario_prompts(name)[:4]
    with LLM(str(path), quantization="int8", block_size=4, kv_cache_memory="1MiB", max_model_len=80,
             max_num_batched_tokens=12) as llm:  # fmt: skip
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        quant = llm.config.quantization
    widened = write_dequantized_checkpoint(path, tmp_path / "widened", quant)
    refs = hf_greedy(widened, prompts, MAX_TOKENS)
    assert [o.outputs[0].token_ids for o in outputs] == [r.token_ids for r in refs]
