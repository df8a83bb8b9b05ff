"""EngineConfig and parse_memory; transformers-4.x and 5.x shaped config.json give the same engine output."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig, parse_memory
from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS, build_checkpoint
from tests.conftest import CheckpointCache, ReferenceCache, make_prompts, token_prompts


@pytest.mark.parametrize(
    "value, expected",
    [
        (65536, 65536),
        (1.5e3, 1500),
        ("65536", 65536),
        ("64KiB", 64 * 1024),
        ("64kib", 64 * 1024),
        (" 64 KiB ", 64 * 1024),
        ("64KB", 64_000),
        ("64k", 64_000),
        ("2GiB", 2 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5G", 1_500_000_000),
        ("0.5MiB", 2**19),
        ("1TiB", 2**40),
        ("10b", 10),
    ],
)
def test_parse_memory(value: int | float | str, expected: int) -> None:
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["lots", "12XB", "", "GiB", "-1GiB", "1,5G", 0, -5, "0", True, None, [1]])
def test_parse_memory_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_memory(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="my_budget"):
        parse_memory(value, name="my_budget")  # type: ignore[arg-type]


def test_defaults_come_from_the_checkpoint(checkpoint: CheckpointCache) -> None:
    config = EngineConfig.create(str(checkpoint("qwen3-gqa")), device="cpu")
    assert config.max_model_len == 512  # max_position_embeddings
    assert config.dtype == torch.float32 and config.device == "cpu"
    assert config.tokenizer == config.model
    assert config.enable_prefix_caching and config.enable_chunked_prefill
    assert config.kv_cache_memory is None
    assert EngineConfig.create(str(checkpoint("qwen3-gqa")), kv_cache_memory="1MiB").kv_cache_memory == 2**20
    assert EngineConfig.create(str(checkpoint("qwen3-gqa")), dtype="bf16").dtype == torch.bfloat16


def test_config_is_read_only(checkpoint: CheckpointCache) -> None:
    config = EngineConfig.create(str(checkpoint("qwen3-gqa")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_size = 8  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ v4 vs v5 configs


@pytest.mark.parametrize("name", ["llama3-rope-scaling", "qwen3-gqa"])
def test_v4_and_v5_config_shapes_give_identical_output(
    name: str, tmp_path: pathlib.Path, checkpoint: CheckpointCache, hf_reference: ReferenceCache
) -> None:
    """The same weights with a config.json as transformers 4.x wrote it (top-level rope_theta / rope_scaling,
    torch_dtype) and as 5.x writes it (rope_parameters, dtype): nanoserve must read both the same way."""
    kwargs = {k: v for k, v in DEFAULT_ARCH_CONFIGS[name].items() if k != "config_style"}
    v5 = checkpoint(name)  # built as v5
    v4 = build_checkpoint(tmp_path / "v4", **kwargs, config_style="v4")
    raw4, raw5 = json.loads((v4 / "config.json").read_text()), json.loads((v5 / "config.json").read_text())
    assert "rope_parameters" not in raw4 and "rope_theta" in raw4 and "torch_dtype" in raw4
    assert "rope_parameters" in raw5 and "rope_theta" not in raw5

    c4, c5 = EngineConfig.create(str(v4)), EngineConfig.create(str(v5))
    assert c4.hf_config.rope_parameters == c5.hf_config.rope_parameters
    assert (c4.max_model_len, c4.dtype) == (c5.max_model_len, c5.dtype)

    # Positions past original_max_position_embeddings (64) so llama3 scaling is exercised.
    prompts = make_prompts(int(kwargs.get("vocab_size", 512)), 3, seed=50, min_len=50, max_len=80)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=16, logprobs=0)
    results = []
    for path in (v4, v5):
        with LLM(str(path), block_size=8, kv_cache_memory="1MiB", max_model_len=128) as llm:
            results.append(llm.generate(token_prompts(prompts), params, use_tqdm=False))
    tokens4 = [o.outputs[0].token_ids for o in results[0]]
    tokens5 = [o.outputs[0].token_ids for o in results[1]]
    assert tokens4 == tokens5 == [r.token_ids for r in hf_reference(name, prompts, 16)]
    lp4 = [e[t].logprob for o in results[0] for e, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
    lp5 = [e[t].logprob for o in results[1] for e, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
    assert lp4 == lp5  # same weights, same config: bit-identical
