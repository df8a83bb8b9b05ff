"""Sliding-window attention against transformers, with prompts and outputs well past a window of 8: prefill in
one piece and in chunks, prefix-cache hits, decode, on the C kernels and on pure torch; and the layers that
slide (and those that do not) are the ones the config names."""

from __future__ import annotations

import pytest

from nanoserve import LLM, SamplingParams
from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS
from tests.conftest import (
    CheckpointCache,
    ReferenceCache,
    assert_all_blocks_free,
    make_prompts,
    token_prompts,
    vocab_size_of,
)
from tests.model.test_parity import assert_matches_reference, traced_llm

WINDOW = 8
MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS, logprobs=0)
WINDOWED = ["mistral-window", "qwen2-window"]


def test_the_configured_layers_slide(checkpoint: CheckpointCache) -> None:
    for name, expected in (("mistral-window", [WINDOW] * 2), ("qwen2-window", [0, WINDOW, WINDOW])):
        assert DEFAULT_ARCH_CONFIGS[name]["extra_config"]["sliding_window"] == WINDOW
        with LLM(str(checkpoint(name)), kv_cache_memory="1MiB", max_model_len=128) as llm:
            model = llm.engine.executor.runner.model
            assert [a.sliding_window for a in model.attention_layers()] == expected


def test_the_window_changes_the_output(checkpoint: CheckpointCache, hf_reference: ReferenceCache, tmp_path) -> None:
    """Without this, parity could pass with the window ignored: the same weights with full attention give
    other tokens."""
    import json
    import shutil

    full = tmp_path / "full"
    shutil.copytree(checkpoint("mistral-window"), full)
    config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    prompts = make_prompts(vocab_size_of("mistral-window"), 3, seed=3, min_len=20, max_len=40)
    refs = hf_reference("mistral-window", prompts, MAX_TOKENS)
    with LLM(str(full), kv_cache_memory="2MiB", max_model_len=128) as llm:
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert any(o.outputs[0].token_ids != r.token_ids for o, r in zip(outputs, refs))


@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "torch"])
@pytest.mark.parametrize("name", WINDOWED)
def test_sliding_window_parity_through_chunks_and_cache_hits(
    name: str, native: bool, checkpoint: CheckpointCache, hf_reference: ReferenceCache, monkeypatch
) -> None:
    if not native:
        monkeypatch.setenv("NANOSERVE_NATIVE", "0")
    vocab = vocab_size_of(name)
    shared = make_prompts(vocab, 1, seed=7, min_len=21, max_len=21)[0]
    prompts = make_prompts(vocab, 4, seed=5, min_len=9, max_len=60)
    prompts += [shared + p for p in make_prompts(vocab, 2, seed=6, min_len=3, max_len=12)]
    refs = hf_reference(name, prompts, MAX_TOKENS)
    assert len({tuple(r.token_ids) for r in refs}) == len(refs)
    # At most 12 tokens a step: long prompts are prefilled in pieces whose queries see keys of the piece before;
    # blocks of 4, so the window's first key falls inside a block.
    llm, trace = traced_llm(str(checkpoint(name)), max_num_batched_tokens=12, max_model_len=128,
                            kv_cache_memory="2MiB")  # fmt: skip
    with llm:
        first = llm.generate(token_prompts(prompts[:5]), GREEDY, use_tqdm=False)  # the shared prefix is cached
        second = llm.generate(token_prompts(prompts[5:]), GREEDY, use_tqdm=False)
        assert_matches_reference(first + second, refs, prompts)
        assert_all_blocks_free(llm.engine)
    assert any(reused > 0 for _, _, reused in trace.allocations), "no prefix-cache hit happened"
    continued = [c for step in trace.steps for c in step.chunks if len(c.token_ids) > 1 and c.start > WINDOW]
    assert continued, "no prompt was prefilled in pieces past the window"
