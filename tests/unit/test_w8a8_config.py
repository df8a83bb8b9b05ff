"""compressed-tensors ``int-quantized`` (W8A8) checkpoints: what is detected, and every scheme or tensor nanoserve
cannot use refused with a ValueError that names the config field or the tensor and says what would work.

Config cases go through ``EngineConfig.create`` on the packer's checkpoint with its config.json edited; tensor
cases load it (``LLM``) after damaging one tensor, as tests/unit/test_quant_bad_input.py does for the other
formats.
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import shutil
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.quantization.config import resolve
from nanoserve.testing.checkpoints import build_checkpoint
from tests.quant_packers import int_quantized_quantization_config, write_quantized_checkpoint

SMALL = {"kv_cache_memory": "1MiB", "max_model_len": 32}
P = "model.layers.0."
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """hidden 64, intermediate 96 (down_proj's 96 inputs are 48 per rank at TP 2), one layer: W8A8 per channel,
    and per group of 32."""
    root = tmp_path_factory.mktemp("w8a8_bad")
    src = build_checkpoint(root / "float", arch="qwen3", vocab_size=320, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=1, seed=3)  # fmt: skip
    out = {"float": src}
    out["channel"], _ = write_quantized_checkpoint(src, root / "channel", "int-quantized", 8, -1, True)
    out["group"], _ = write_quantized_checkpoint(src, root / "group", "int-quantized", 8, 32, True)
    return out


def copy_of(src: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A private copy to damage (without the packer's dequantized/ twin)."""
    return pathlib.Path(shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("dequantized")))


def assert_names(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"message lacks {missing}: {message}"


def _hf(qc: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=None,
                           quantization_config=qc)  # fmt: skip


def _group(q: dict) -> dict:
    return q["config_groups"]["group_0"]


# ------------------------------------------------------------------------------------------------ detection


def test_w8a8_is_int8_weights_with_the_int8_activations_it_prescribes() -> None:
    quant = resolve(_hf(int_quantized_quantization_config(-1, ["lm_head"])), None)
    assert (quant.method, quant.ct_format, quant.tensor_format) == ("compressed-tensors", "int-quantized", "int-quantized")
    assert (quant.scheme.bits, quant.scheme.group_size, quant.scheme.asymmetric) == (8, -1, False)
    assert quant.activations == "int8" and quant.lm_head is None and quant.checkpoint_ignore == ("lm_head",)
    assert "int-quantized" in quant.describe() and "int8 activations" in quant.describe()
    assert resolve(_hf(int_quantized_quantization_config(32, [])), "compressed-tensors").scheme.group_size == 32
    assert resolve(_hf(int_quantized_quantization_config(-1, [])), None, activations="int8").activations == "int8"


def test_explicit_fp32_activations_run_the_weights_alone_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nanoserve.quantization.config"):
        quant = resolve(_hf(int_quantized_quantization_config(-1, [])), None, activations="fp32")
    assert quant.activations == "fp32" and quant.ct_format == "int-quantized"
    assert any("prescribes dynamic per-token int8 activations" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "edit",
    [
        lambda q: _group(q).pop("format"),  # compressed-tensors before per-group formats
        lambda q: q.pop("format"),
        lambda q: q.update(format="mixed-precision"),  # the model-wide summary defers to the group's format
    ],
    ids=["model-wide-only", "per-group-only", "mixed-precision"],
)
def test_the_format_is_read_model_wide_or_per_group(edit: Callable[[dict], None]) -> None:
    qc = int_quantized_quantization_config(-1, [])
    edit(qc)
    assert resolve(_hf(qc), None).ct_format == "int-quantized"


def test_int_quantized_without_input_activations_is_weight_only() -> None:
    quant = resolve(_hf(int_quantized_quantization_config(-1, [], input_activations=None)), None)
    assert quant.ct_format == "int-quantized" and quant.activations == "fp32"


def test_w8a8_checkpoints_open_through_engine_config(ckpts) -> None:
    for name, group in (("channel", -1), ("group", 32)):
        quant = EngineConfig.create(str(ckpts[name])).quantization
        assert quant.tensor_format == "int-quantized" and quant.scheme.group_size == group
        assert quant.activations == "int8"
        assert EngineConfig.create(str(ckpts[name]), quantization_activations="fp32").quantization.activations == "fp32"


# -------------------------------------------------------------------------------------- unsupported schemes

ACT = "config_groups.group_0.input_activations"
W = "config_groups.group_0.weights"
CONFIG_CASES = {
    "static-activation-scales": (
        lambda q: _group(q)["input_activations"].update(dynamic=False, strategy="tensor"),
        [f"{ACT}.dynamic false", "static activation scales", "input_scale", 'dynamic true, strategy "token"'],
    ),
    "asymmetric-activations": (
        lambda q: _group(q)["input_activations"].update(symmetric=False),
        [f"{ACT}.symmetric false", "asymmetric activations", "symmetric true"],
    ),
    "per-tensor-activations": (
        lambda q: _group(q)["input_activations"].update(strategy="tensor"),
        [f'{ACT}.strategy "tensor"', 'strategy "token"'],
    ),
    "grouped-activations": (
        lambda q: _group(q)["input_activations"].update(strategy="group", group_size=32),
        [f'{ACT}.strategy "group"', 'strategy "token"'],
    ),
    "int4-activations": (lambda q: _group(q)["input_activations"].update(num_bits=4), [f"{ACT}.num_bits 4", "num_bits 8"]),
    "fp8-activations": (lambda q: _group(q)["input_activations"].update(type="float"), [f'{ACT}.type "float"', 'type "int"']),
    "local-dynamic-activations": (
        lambda q: _group(q)["input_activations"].update(dynamic="local"), [f'{ACT}.dynamic "local"', "dynamic true"],
    ),
    "asymmetric-weights": (lambda q: _group(q)["weights"].update(symmetric=False), [f"{W}.symmetric false", "symmetric"]),
    "int4-weights": (lambda q: _group(q)["weights"].update(num_bits=4), [f"{W}.num_bits", "4-bit", "supported: 8"]),
    "per-tensor-weights": (lambda q: _group(q)["weights"].update(strategy="tensor"), [f"{W}.strategy 'tensor'", "group, channel"]),
    "output-activations": (
        lambda q: _group(q).update(output_activations=dict(_group(q)["input_activations"])),
        ["config_groups.group_0.output_activations", "not supported"],
    ),
    "fp8-format": (
        lambda q: (q.update(format="float-quantized"), _group(q).update(format="float-quantized")),
        ["format 'float-quantized'", "pack-quantized (W4A16 / W8A16", "int-quantized (W8A8"],
    ),
    "formats-disagree": (
        lambda q: _group(q).update(format="pack-quantized"),
        ["format 'int-quantized' (quantization_config.format)", "config_groups.group_0.format 'pack-quantized'"],
    ),
    "pack-quantized-with-activations": (
        lambda q: (q.update(format="pack-quantized"), _group(q).update(format="pack-quantized")),
        ["config_groups.group_0", "activation quantization", "format 'pack-quantized'", "int-quantized"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_unsupported_w8a8_schemes_name_the_field_and_the_choices(ckpts, tmp_path: pathlib.Path, case: str) -> None:
    edit, words = CONFIG_CASES[case]
    path = copy_of(ckpts["channel"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        EngineConfig.create(str(path))
    assert_names(err, *words)


def test_a_static_scale_checkpoint_with_its_input_scale_tensors(ckpts, tmp_path: pathlib.Path) -> None:
    """What llmcompressor writes for static W8A8: dynamic false, per-tensor, one input_scale per layer. Refused
    from the config, before any tensor is read."""
    path = copy_of(ckpts["channel"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    _group(config["quantization_config"])["input_activations"].update(dynamic=False, strategy="tensor")
    (path / "config.json").write_text(json.dumps(config))
    weights = load_file(path / "model.safetensors")
    for name in [k for k in weights if k.endswith(".weight_scale")]:
        weights[name.replace(".weight_scale", ".input_scale")] = torch.tensor([0.01])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        LLM(str(path), **SMALL)
    assert_names(err, f"{ACT}.dynamic false", "input_scale", "supported: dynamic per-token int8")


# ------------------------------------------------------------------------------------------------ tensors

TENSOR_CASES = {
    "weight-float": (P + "self_attn.q_proj.weight", lambda t: t.to(torch.float32), ["dtype torch.float32", "torch.int8"]),
    "weight-int32": (P + "mlp.down_proj.weight", lambda t: t.to(torch.int32), ["dtype torch.int32", "torch.int8"]),
    "weight-rows": (P + "self_attn.k_proj.weight", lambda t: t[:-1], ["shape (31, 64)", "expected (32, 64)"]),
    "weight-columns": (P + "mlp.up_proj.weight", lambda t: t[:, :-1], ["shape (96, 63)", "expected (96, 64)"]),
    "weight-packed-shape": (P + "self_attn.o_proj.weight", lambda t: t.view(torch.int32), ["dtype torch.int32"]),
    "scale-groups": (P + "mlp.gate_proj.weight_scale", lambda t: t.expand(-1, 2), ["shape (96, 2)", "expected (96, 1)"]),
    "scale-rows": (P + "self_attn.v_proj.weight_scale", lambda t: t[:-1], ["shape (31, 1)", "expected (32, 1)"]),
    "scale-int": (P + "self_attn.o_proj.weight_scale", lambda t: t.to(torch.int32), ["dtype torch.int32", "float"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_a_w8a8_tensor_of_the_wrong_dtype_or_shape_is_named(ckpts, tmp_path: pathlib.Path, case: str) -> None:
    tensor, damage, words = TENSOR_CASES[case]
    path = copy_of(ckpts["channel"], tmp_path)
    weights = load_file(path / "model.safetensors")
    weights[tensor] = damage(weights[tensor]).contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        LLM(str(path), **SMALL)
    assert_names(err, tensor, *words)


def test_a_missing_weight_scale_is_named(ckpts, tmp_path: pathlib.Path) -> None:
    path = copy_of(ckpts["channel"], tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights[P + "mlp.down_proj.weight_scale"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as err:
        LLM(str(path), **SMALL)
    assert_names(err, P + "mlp.down_proj.weight_scale")


def _generate(path: pathlib.Path) -> list[list[int]]:
    with LLM(str(path), **SMALL) as llm:
        outs = llm.generate([{"prompt_token_ids": [5, 9, 13, 17, 21]}, {"prompt_token_ids": [30, 3]}], GREEDY, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def test_zero_points_older_versions_wrote_are_checked_and_dropped(ckpts, tmp_path: pathlib.Path) -> None:
    """compressed-tensors < 0.12 saved a symmetric scheme's weight_zero_point (int8 zeros); with it the model is
    the same, in a sharded checkpoint where the zero points sit in a later file than their weights too. A
    zero point that is not zero contradicts ``symmetric: true`` and is named."""
    weights = load_file(ckpts["channel"] / "model.safetensors")
    zeros = {k.replace("weight_scale", "weight_zero_point"): torch.zeros(v.shape, dtype=torch.int8)
             for k, v in weights.items() if k.endswith(".weight_scale")}  # fmt: skip
    sharded = copy_of(ckpts["channel"], tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": zeros}
    for name, tensors in shards.items():
        save_file(tensors, sharded / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _generate(sharded) == _generate(ckpts["channel"])

    bad = copy_of(ckpts["channel"], tmp_path / "bad")
    damaged = dict(copy.copy(weights), **zeros)
    damaged[P + "self_attn.k_proj.weight_zero_point"] = torch.ones((32, 1), dtype=torch.int8)
    save_file(damaged, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        LLM(str(bad), **SMALL)
    assert_names(err, P + "self_attn.k_proj.weight_zero_point", "symmetric")


# ------------------------------------------------------------------------------------------ tensor parallel


def test_a_tensor_parallel_size_that_does_not_divide_the_layers(ckpts) -> None:
    """TP 3: 4 heads and 96 intermediate rows do not split three ways; refused before any rank starts."""
    with pytest.raises(ValueError) as err:
        EngineConfig.create(str(ckpts["channel"]), tensor_parallel_size=3)
    assert_names(err, "num_attention_heads (4)", "tensor_parallel_size (3)")


def test_a_tensor_parallel_size_that_splits_a_group(ckpts) -> None:
    """Per group of 32, TP 2 gives down_proj 48 inputs per rank: refused with the sizes that work; per channel
    the same split is fine."""
    with pytest.raises(ValueError) as err:
        EngineConfig.create(str(ckpts["group"]), tensor_parallel_size=2)
    assert_names(err, "model.layers.*.mlp.down_proj", "group size 32", "tensor_parallel_size 2", "sizes that work are 1")
    assert EngineConfig.create(str(ckpts["channel"]), tensor_parallel_size=2).quantization.ct_format == "int-quantized"
