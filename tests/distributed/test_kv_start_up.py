"""Start-up against the KV cache with real ranks: a default max_model_len lowered to what the agreed blocks
hold (the same length on every rank), an explicit one that does not fit still refused, and the per-layer
consistency check refusing when one layer of one rank is short (``NANOSERVE_TEST_SHORT_KV``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from nanoserve import LLM, SamplingParams
from tests.distributed.conftest import make_prompts

AGREEMENT_LOGGER = "nanoserve.distributed.kv_agreement"
LONG_CONTEXT = 40960  # Qwen3's configured context, far beyond what a 64 KiB cache holds


@pytest.fixture(scope="module")
def long_context_checkpoint(tp_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> str:
    """qwen3-gqa's weights under a config.json whose max_position_embeddings is Qwen3's 40960."""
    path = tmp_path_factory.mktemp("long-context") / "qwen3-gqa-40k"
    shutil.copytree(tp_checkpoints("qwen3-gqa"), path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return str(path)


def bytes_per_block(path: str, block_size: int, tp: int) -> int:
    """K and V of every layer for one block on one rank, from config.json (fp32 on CPU)."""
    hf = json.loads((Path(path) / "config.json").read_text())
    kv_heads_per_rank = max(1, hf["num_key_value_heads"] // tp)
    return 2 * hf["num_hidden_layers"] * block_size * kv_heads_per_rank * hf["head_dim"] * 4


def lowered_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == AGREEMENT_LOGGER and "max_model_len lowered" in r.getMessage()
    ]


def test_default_max_model_len_is_lowered_to_what_fits(long_context_checkpoint, caplog) -> None:
    block_size, budget = 4, 64 * 1024
    expected = budget // bytes_per_block(long_context_checkpoint, block_size, tp=1) * block_size  # 16 blocks: 64
    with caplog.at_level(logging.WARNING, logger=AGREEMENT_LOGGER):
        llm = LLM(long_context_checkpoint, kv_cache_memory=budget, block_size=block_size)
    with llm:
        assert llm.config.max_model_len == LONG_CONTEXT and not llm.config.max_model_len_explicit
        info = llm.kv_cache_info()
        assert info["max_model_len"] == expected == info["num_blocks"] * block_size
        out = llm.generate(
            [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
        )
        assert len(out[0].outputs[0].token_ids) == 8
    (warning,) = lowered_warnings(caplog)
    assert f"from the default {LONG_CONTEXT} to {expected}" in warning
    assert "raise kv_cache_memory" in warning and "pass max_model_len explicitly" in warning


def test_explicit_max_model_len_that_does_not_fit_still_refuses(long_context_checkpoint) -> None:
    # 64 KiB at 4 KiB a block: 16 blocks of 4 tokens hold 64; 65 tokens need 17 blocks.
    with pytest.raises(RuntimeError, match=r"KV cache too small: rank 0 can hold 16 blocks.*max_model_len \(65\)"):
        LLM(long_context_checkpoint, kv_cache_memory="64KiB", block_size=4, max_model_len=65)
    with LLM(long_context_checkpoint, kv_cache_memory="64KiB", block_size=4, max_model_len=64) as llm:
        assert llm.kv_cache_info()["max_model_len"] == 64  # exactly fits: served as given


def test_tp2_serves_the_short_ranks_length_on_both(long_context_checkpoint, monkeypatch, caplog) -> None:
    """Rank 1 has half rank 0's budget: both ranks serve the length rank 1's blocks hold. A sequence that
    long touches every agreed block on both ranks, so a rank sized from its own budget would show."""
    block_size, budget = 4, 64 * 1024
    per_block = bytes_per_block(long_context_checkpoint, block_size, tp=2)
    expected = int(budget * 0.5) // per_block * block_size  # rank 1: 16 blocks of 4 tokens
    prompts = make_prompts(2, seed=21, low=20, high=20)
    params = SamplingParams(temperature=0, max_tokens=expected - 20, ignore_eos=True)
    with LLM(long_context_checkpoint, kv_cache_memory="1MiB", block_size=block_size, max_model_len=expected) as single:
        want = [
            o.outputs[0].token_ids
            for o in single.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        ]

    monkeypatch.setenv("NANOSERVE_KV_BUDGET_SCALE", "1,0.5")
    with caplog.at_level(logging.WARNING, logger=AGREEMENT_LOGGER):
        llm = LLM(long_context_checkpoint, tensor_parallel_size=2, kv_cache_memory=budget, block_size=block_size)
    with llm:
        info = llm.kv_cache_info()
        assert info["local_num_blocks"] == [budget // per_block, int(budget * 0.5) // per_block]
        assert info["max_model_len"] == expected == min(info["local_num_blocks"]) * block_size
        assert info["allocated_num_blocks"] == [info["num_blocks"]] * 2
        # One sequence at a time, each as long as the served length: all 16 blocks in use on both ranks.
        got = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert got == want
    assert len(lowered_warnings(caplog)) == 1  # once, from rank 0


@pytest.mark.parametrize("short", ["1:1", "0:0"])
def test_one_short_layer_on_one_rank_refuses_to_start(tp_checkpoints, monkeypatch, short: str) -> None:
    """Negative control with real worker processes: one layer of one rank gets one block fewer than agreed."""
    rank, layer = short.split(":")
    monkeypatch.setenv("NANOSERVE_TEST_SHORT_KV", short)
    # 2 MiB at 2 KiB a block (TP=2, 4-token blocks): 1024 agreed; the short layer has 1023.
    with pytest.raises(
        RuntimeError, match=rf"KV cache mismatch: .*ranks \[{rank}\] disagree: rank {rank} layer {layer} has 1023\."
    ):
        LLM(tp_checkpoints("qwen3-gqa"), tensor_parallel_size=2, kv_cache_memory="2MiB", block_size=4, max_model_len=64)


def test_every_layer_of_every_rank_is_reported(tp_checkpoints, monkeypatch) -> None:
    monkeypatch.delenv("NANOSERVE_TEST_SHORT_KV", raising=False)
    with LLM(
        tp_checkpoints("qwen3-gqa"), tensor_parallel_size=2, kv_cache_memory="2MiB", block_size=4, max_model_len=64
    ) as llm:
        info = llm.engine.executor.kv_info
        num_layers = llm.config.hf_config.num_hidden_layers
        assert info.allocated_per_layer == [[info.num_blocks] * num_layers] * 2
        assert info.num_blocks == 1024
