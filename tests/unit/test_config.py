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


# gemma3: a rope per layer type (rope_parameters keyed by layer type vs rope_theta + rope_local_base_freq)
@pytest.mark.parametrize("name", ["llama3-rope-scaling", "qwen3-gqa", "gemma3"])
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


# ------------------------------------------------------------------------------------------------ max_model_len


def test_max_model_len_explicit_is_recorded(checkpoint: CheckpointCache) -> None:
    """Start-up lowers a default max_model_len that the KV cache cannot hold, but never an explicit one."""
    path = str(checkpoint("qwen3-gqa"))
    assert not EngineConfig.create(path).max_model_len_explicit
    explicit = EngineConfig.create(path, max_model_len=512)
    assert explicit.max_model_len_explicit and explicit.max_model_len == 512


# ------------------------------------------------------------------------------------------------ sliding windows
# Which layers slide, read from config.json as transformers resolves it (the attention layers take their window
# from this); config.json alone is enough for EngineConfig.create, written by transformers' own config classes.

SMALL_MODEL = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip


def _config_dir(path: pathlib.Path, arch: str, drop: tuple[str, ...] = (), **overrides: object) -> str:
    """A directory holding only the config.json transformers writes for ``arch``; ``overrides`` are then set in
    the JSON itself (as a config written by another transformers version may carry them), ``drop`` removed."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {
        "MistralForCausalLM": MistralConfig, "Qwen2ForCausalLM": Qwen2Config,
        "Qwen3ForCausalLM": Qwen3Config, "LlamaForCausalLM": LlamaConfig,
    }  # fmt: skip
    config = classes[arch](**SMALL_MODEL, architectures=[arch])
    config.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in drop} | overrides
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return str(path)


# (arch, config.json fields, JSON keys removed, {windowed layer: window})
WINDOW_CASES = {
    # Mistral v0.1 style: sliding_window, no layer_types; the window applies to every layer.
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 64}, (), {0: 64, 1: 64, 2: 64}),
    "mistral-no-window": ("MistralForCausalLM", {"sliding_window": None}, (), {}),
    "mistral-window-beyond-context": ("MistralForCausalLM", {"sliding_window": 4096}, (), {0: 4096, 1: 4096, 2: 4096}),
    # Qwen2 as transformers 4.x wrote it (no layer_types): transformers 5 resolves layer_types from
    # use_sliding_window and max_window_layers; layers >= max_window_layers slide.
    "qwen2-v4-window-from-layer-1": (
        "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
        ("layer_types",), {1: 64, 2: 64},
    ),
    # sliding_window set, but every layer is below max_window_layers: all full attention.
    "qwen2-v4-window-on-no-layer": (
        "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 3},
        ("layer_types",), {},
    ),
    # Real Qwen2.5 checkpoints: sliding_window given, use_sliding_window false: full attention everywhere.
    "qwen2-v4-window-disabled": (
        "Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 64}, ("layer_types",), {},
    ),
    # transformers 5 shape: explicit layer_types decide which layers slide.
    "qwen3-layer-types": (
        "Qwen3ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 96,
         "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
        (), {1: 96},
    ),  # fmt: skip
    "llama": ("LlamaForCausalLM", {}, (), {}),
}


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sliding_window_layers_and_no_cap_on_the_context(case: str, tmp_path: pathlib.Path) -> None:
    """Each layer's window as transformers resolves the config, and (sliding-window attention being implemented)
    the context is the model's whole max_position_embeddings, by default or asked for."""
    from nanoserve.config import sliding_window_layers
    from nanoserve.models.decoder import sliding_window_of

    arch, fields, drop, expected = WINDOW_CASES[case]
    path = _config_dir(tmp_path, arch, drop, **fields)
    config = EngineConfig.create(path)
    assert sliding_window_layers(config.hf_config) == expected
    assert [sliding_window_of(config.hf_config, i) for i in range(3)] == [expected.get(i) for i in range(3)]
    assert config.max_model_len == 512
    assert EngineConfig.create(path, max_model_len=512).max_model_len == 512
