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


# ------------------------------------------------------------------------------------------------ max_model_len


def test_max_model_len_explicit_is_recorded(checkpoint: CheckpointCache) -> None:
    """Start-up lowers a default max_model_len that the KV cache cannot hold, but never an explicit one."""
    path = str(checkpoint("qwen3-gqa"))
    assert not EngineConfig.create(path).max_model_len_explicit
    explicit = EngineConfig.create(path, max_model_len=512)
    assert explicit.max_model_len_explicit and explicit.max_model_len == 512


# ------------------------------------------------------------------------------------------------ sliding windows
# Sliding-window attention is not implemented: a config with a window must not run past it. config.json alone
# is enough for EngineConfig.create, written by transformers' own config classes.

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


# (arch, config.json fields, JSON keys removed, expected default max_model_len, windowed layers named)
WINDOW_CASES = {
    # Mistral v0.1 style: sliding_window, no layer_types; the window applies to every layer.
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 64}, (), 64, "0-2"),
    "mistral-no-window": ("MistralForCausalLM", {"sliding_window": None}, (), 512, None),
    "mistral-window-beyond-context": ("MistralForCausalLM", {"sliding_window": 4096}, (), 512, None),
    # Qwen2 as transformers 4.x wrote it (no layer_types): transformers 5 resolves layer_types from
    # use_sliding_window and max_window_layers; layers >= max_window_layers slide.
    "qwen2-v4-window-from-layer-1": (
        "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
        ("layer_types",), 64, "1-2",
    ),
    # sliding_window set, but every layer is below max_window_layers: all full attention, so no cap.
    "qwen2-v4-window-on-no-layer": (
        "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 3},
        ("layer_types",), 512, None,
    ),
    # Real Qwen2.5 checkpoints: sliding_window given, use_sliding_window false: full attention everywhere.
    "qwen2-v4-window-disabled": (
        "Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 64}, ("layer_types",), 512, None,
    ),
    # transformers 5 shape: explicit layer_types decide which layers slide.
    "qwen3-layer-types": (
        "Qwen3ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 96,
         "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
        (), 96, "1",
    ),  # fmt: skip
    "llama": ("LlamaForCausalLM", {}, (), 512, None),
}


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_default_max_model_len_is_capped_at_the_smallest_window(
    case: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    arch, fields, drop, expected, layers = WINDOW_CASES[case]
    path = _config_dir(tmp_path, arch, drop, **fields)
    with caplog.at_level("WARNING", logger="nanoserve.config"):
        config = EngineConfig.create(path)
    assert config.max_model_len == expected
    warnings = [r.getMessage() for r in caplog.records if r.name == "nanoserve.config"]
    if layers is None:
        assert not warnings
    else:
        (warning,) = warnings
        assert f"max_model_len defaults to {expected}, the sliding window of layers {layers}," in warning
        assert "max_position_embeddings (512)" in warning


def test_window_left_set_on_full_attention_layers_does_not_cap(tmp_path: pathlib.Path) -> None:
    """The layer types decide, not the presence of sliding_window: here transformers keeps the window
    (use_sliding_window is true) but resolves every layer to full attention."""
    arch, fields, drop, _, _ = WINDOW_CASES["qwen2-v4-window-on-no-layer"]
    config = EngineConfig.create(_config_dir(tmp_path, arch, drop, **fields), max_model_len=512)
    assert config.hf_config.sliding_window == 64
    assert set(config.hf_config.layer_types) == {"full_attention"}
    assert config.max_model_len == 512


@pytest.mark.parametrize("case", ["mistral-window", "qwen2-v4-window-from-layer-1", "qwen3-layer-types"])
def test_explicit_max_model_len_beyond_the_window_is_refused(case: str, tmp_path: pathlib.Path) -> None:
    arch, fields, drop, window, layers = WINDOW_CASES[case]
    path = _config_dir(tmp_path, arch, drop, **fields)
    with pytest.raises(
        ValueError,
        match=rf"^max_model_len: {window + 1} is longer than the sliding window \({window} tokens\) of layers "
        rf"{layers};.*pass max_model_len <= {window}$",
    ):
        EngineConfig.create(path, max_model_len=window + 1)
    config = EngineConfig.create(path, max_model_len=window)  # the length the error suggests works
    assert config.max_model_len == window and config.max_model_len_explicit
    assert EngineConfig.create(path, max_model_len=16).max_model_len == 16
