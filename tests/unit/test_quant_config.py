"""Defaults of the quantization options that depend on the model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nanoserve.quantization.config import resolve


def _config(hidden: int, intermediate: int, heads: int = 8, head_dim: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, head_dim=head_dim,
        quantization_config=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "hidden,intermediate,heads,head_dim,want",
    [
        (1024, 3072, 16, 128, 128),  # Qwen3-0.6B
        (576, 1536, 9, None, 64),  # SmolLM2-135M: 576 = 4.5 x 128
        (96, 256, 4, None, 32),  # 96 is not a multiple of 64
        (4096, 12288, 32, 128, 128),  # Qwen3-8B
    ],
)
def test_int4_default_group_is_128_or_the_largest_that_fits(hidden, intermediate, heads, head_dim, want) -> None:
    quant = resolve(_config(hidden, intermediate, heads, head_dim), "int4")
    assert quant.scheme.group_size == want


def test_an_explicit_group_size_is_kept_even_where_the_default_would_differ() -> None:
    assert resolve(_config(576, 1536, 9), "int4", group_size=32).scheme.group_size == 32
    assert resolve(_config(576, 1536, 9), "int4", group_size=128).scheme.group_size == 128  # the layers refuse it


def test_int8_is_per_channel_with_an_int8_lm_head_unless_skipped() -> None:
    quant = resolve(_config(1024, 3072, 16, 128), "int8")
    assert quant.scheme.group_size == -1 and quant.lm_head is not None
    assert resolve(_config(1024, 3072, 16, 128), "int8", skip="lm_head").lm_head is None


def test_on_load_options_are_refused_for_a_quantized_checkpoint() -> None:
    config = _config(1024, 3072, 16, 128)
    config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert resolve(config, None).method == "awq"
    for option in (dict(skip="lm_head"), dict(group_size=64), dict(zero_point=True)):
        with pytest.raises(ValueError, match="apply to quantize-on-load"):
            resolve(config, None, **option)


def test_a_malformed_regex_pattern_is_refused_naming_where_it_came_from() -> None:
    with pytest.raises(ValueError, match=r"quantization_skip: 're:\(unclosed' is not a valid regular expression"):
        resolve(_config(1024, 3072, 16, 128), "int4", skip="lm_head,re:(unclosed")
    config = _config(1024, 3072, 16, 128)
    config.quantization_config = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head", "re:.*mlp.gate[$"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}},
    }  # fmt: skip
    with pytest.raises(ValueError, match="the checkpoint's ignore list: 're:.*mlp.gate"):
        resolve(config, None)
    assert resolve(_config(1024, 3072, 16, 128), "int4", skip="re:.*down_proj$").skip == ("re:.*down_proj$",)
