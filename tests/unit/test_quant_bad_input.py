"""Low-bit weights given something they cannot use: every case is a ValueError that names the option, the
checkpoint field, the layer or the tensor at fault, and says what would work.

Options and checkpoint configs are checked by ``EngineConfig.create`` (no model is built); layer shapes when
the model is built; tensors when they are loaded. Tensor-parallel cases build one rank's shard in this
process (``BuildContext`` with a ``TPGroup`` of size 2: no process group is needed to build or load) and,
once, through ``LLM`` with spawned workers.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoserve import LLM
from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.models.decoder import BuildContext
from nanoserve.models.loader import load_weights
from nanoserve.models.registry import resolve_architecture
from nanoserve.models.shard import build_shard
from nanoserve.platform import default_attention_backend
from nanoserve.testing.checkpoints import build_checkpoint
from tests.quant_packers import write_quantized_checkpoint

SMALL = {"kv_cache_memory": "1MiB", "max_model_len": 32}
# Our fused layers and the checkpoint modules that feed them (the loader names a missing part this way).
FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "0"),
    "up_proj": ("gate_up_proj", "1"),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """hidden 64, intermediate 96 (so down_proj's 96 inputs split into 48 per rank at TP 2), one layer; and
    its GPTQ / AWQ / compressed-tensors forms (4-bit, group 32), plus an act-order GPTQ one of a model with
    intermediate 128 (TP 2 gives whole groups there, so only act-order is in the way)."""
    root = tmp_path_factory.mktemp("quant_bad")
    small = dict(arch="qwen3", vocab_size=320, hidden_size=64, num_hidden_layers=1)
    out = {"float": build_checkpoint(root / "float", intermediate_size=96, **small)}
    out["float128"] = build_checkpoint(root / "float128", intermediate_size=128, **small)
    for fmt, symmetric in (("gptq", True), ("awq", False), ("compressed-tensors", False)):
        out[fmt], _ = write_quantized_checkpoint(out["float"], root / fmt, fmt, 4, 32, symmetric)
    out["gptq-act-order"], _ = write_quantized_checkpoint(
        out["float128"], root / "gptq-act-order", "gptq", 4, 32, True, desc_act=True
    )
    return out


def copy_of(src: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A private copy to damage (without the packer's dequantized/ twin)."""
    return pathlib.Path(shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("dequantized")))


def assert_names(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"message lacks {missing}: {message}"


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "options, words",
    [
        ({"quantization": "int3"}, ["quantization", "'int3'", "int8", "int4", "gptq", "awq", "compressed-tensors"]),
        ({"quantization": "int4", "quantization_group_size": 48}, ["quantization_group_size", "48", "32, 64, 128"]),
        ({"quantization": "int4", "quantization_group_size": -1}, ["quantization_group_size", "-1", "32, 64, 128"]),
        ({"quantization": "int8", "quantization_group_size": 32}, ["int8", "per-output-channel", "quantization_group_size", "int4"]),
        ({"quantization": "int8", "quantization_zero_point": True}, ["int8", "symmetric", "quantization_zero_point", "int4"]),
        ({"quantization": "int4", "quantization_activations": "int4"}, ["quantization_activations", "'int4'", "fp32", "int8"]),
        ({"quantization_group_size": 32}, ["quantization_group_size", "quantization='int8' or 'int4'"]),
        ({"quantization_zero_point": True}, ["_zero_point", "quantization='int8' or 'int4'"]),
        ({"quantization_activations": "int8"}, ["_activations", "quantization='int8' or 'int4'"]),
        ({"quantization_skip": "lm_head"}, ["_skip", "quantization='int8' or 'int4'"]),
        ({"quantization": "gptq"}, ["quantization='gptq'", "quantization_config", "float weights", "'int8' or 'int4'"]),
        ({"quantization": "compressed-tensors"}, ["'compressed-tensors'", "float weights", "'int8' or 'int4'"]),
        ({"quantization": "int4", "dtype": "bfloat16"}, ["int4", "float32", "dtype=torch.bfloat16"]),
    ],
    ids=[
        "int3", "int4-group-48", "int4-per-channel", "int8-group", "int8-zero-point", "int4-activations",
        "group-without-quantization", "zero-point-without", "activations-without", "skip-without",
        "gptq-on-float", "compressed-tensors-on-float", "bfloat16",
    ],
)  # fmt: skip
def test_bad_quantization_options_name_the_option(ckpts, options: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        EngineConfig.create(str(ckpts["float"]), **options)
    assert_names(err, *words)


@pytest.mark.parametrize(
    "fmt, options, words",
    [
        ("gptq", {"quantization": "int8"}, ["quantization='int8'", "contradicts", "'gptq'"]),
        ("gptq", {"quantization": "awq"}, ["quantization='awq'", "contradicts", "'gptq'"]),
        ("awq", {"quantization": "int4"}, ["quantization='int4'", "contradicts", "'awq'"]),
        ("compressed-tensors", {"quantization": "gptq"}, ["quantization='gptq'", "'compressed-tensors'"]),
        ("gptq", {"quantization_group_size": 64}, ["quantization_group_size", "already quantized", "gptq"]),
        ("awq", {"quantization_zero_point": True}, ["quantization_zero_point", "already quantized", "awq"]),
    ],
)
def test_options_that_contradict_a_quantized_checkpoint(ckpts, fmt: str, options: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        EngineConfig.create(str(ckpts[fmt]), **options)
    assert_names(err, *words)


def test_quantized_checkpoints_open_with_their_own_or_no_method(ckpts) -> None:
    """The controls: the same checkpoints are accepted as they are (the hub's alias spelling too)."""
    for fmt in ("gptq", "awq", "compressed-tensors"):
        assert EngineConfig.create(str(ckpts[fmt])).quantization.method == fmt
        assert EngineConfig.create(str(ckpts[fmt]), quantization=fmt).quantization.method == fmt
    assert EngineConfig.create(str(ckpts["compressed-tensors"]), quantization="compressed_tensors").quantization
    assert EngineConfig.create(str(ckpts["float"])).quantization is None


# -------------------------------------------------------------------------- the checkpoint's config


def _ct_weights(q: dict) -> dict:
    return q["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize(
    "fmt, edit, words",
    [
        ("gptq", lambda q: q.update(quant_method="fp8"), ["quant_method 'fp8'", "gptq, awq, compressed-tensors", "int8 / int4"]),
        ("gptq", lambda q: q.update(quant_method="bitsandbytes"), ["quant_method 'bitsandbytes'", "gptq, awq, compressed-tensors"]),
        ("gptq", lambda q: q.update(bits=3), ["gptq", "bits", "3-bit", "supported: 4, 8"]),
        ("gptq", lambda q: q.update(checkpoint_format="marlin"), ["gptq checkpoint_format 'marlin'", "gptq, gptq_v2"]),
        ("awq", lambda q: q.update(bits=8), ["awq", "bits", "8-bit", "supported: 4"]),
        ("awq", lambda q: q.update(version="gemv"), ["awq version 'gemv'", "supported: gemm"]),
        ("compressed-tensors", lambda q: q.update(format="int-quantized"), ["compressed-tensors format 'int-quantized'", "pack-quantized"]),
        ("compressed-tensors", lambda q: _ct_weights(q).update(strategy="tensor"), ["strategy 'tensor'", "group, channel"]),
        ("compressed-tensors", lambda q: _ct_weights(q).update(type="float"), ["weights.type 'float'", "int"]),
        ("compressed-tensors", lambda q: _ct_weights(q).update(num_bits=2), ["num_bits", "2-bit", "4, 8"]),
        (
            "compressed-tensors",
            lambda q: q["config_groups"]["group_0"].update(
                input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
            ),
            ["config_groups.group_0", "activation quantization", "W4A16"],
        ),
        (
            "compressed-tensors",
            lambda q: q["config_groups"]["group_0"].update(output_activations={"num_bits": 8, "type": "int"}),
            ["config_groups.group_0", "activation quantization"],
        ),
        ("compressed-tensors", lambda q: q["config_groups"].update(group_1=q["config_groups"]["group_0"]), ["2 config_groups", "one"]),
        ("compressed-tensors", lambda q: q["config_groups"]["group_0"].update(targets=["re:.*q_proj"]), ["targets", "['Linear']"]),
    ],
    ids=[
        "fp8", "bitsandbytes", "gptq-3-bit", "gptq-marlin", "awq-8-bit", "awq-gemv", "ct-int-quantized",
        "ct-strategy-tensor", "ct-float", "ct-2-bit", "ct-input-activations", "ct-output-activations",
        "ct-two-schemes", "ct-targets",
    ],
)  # fmt: skip
def test_unsupported_checkpoint_schemes_name_the_field_and_the_choices(
    ckpts, tmp_path: pathlib.Path, fmt: str, edit: Callable[[dict], None], words: list[str]
) -> None:
    path = copy_of(ckpts[fmt], tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        EngineConfig.create(str(path))
    assert_names(err, *words)


# ---------------------------------------------------------------------------------- layer shapes


@pytest.mark.parametrize(
    "options, words",
    [
        # hidden 64: q/k/v take 64 inputs
        ({"quantization": "int4", "quantization_group_size": 128}, ["model.layers.0.self_attn.qkv_proj", "group size 128", "64"]),
        # intermediate 96: down_proj takes 96
        ({"quantization": "int4", "quantization_group_size": 64}, ["model.layers.0.mlp.down_proj", "group size 64", "96"]),
        # a fused layer's parts share one weight
        ({"quantization": "int4", "quantization_group_size": 32, "quantization_skip": "*.q_proj"}, ["quantization_skip", "qkv_proj", "q_proj", "all of them or none"]),
    ],
    ids=["g128-over-64-inputs", "g64-over-96-inputs", "skip-part-of-fused"],
)  # fmt: skip
def test_layers_that_cannot_take_the_scheme_are_named(ckpts, options: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        LLM(str(ckpts["float"]), **options, **SMALL)
    assert_names(err, *words)


def test_checkpoint_group_size_the_layout_cannot_hold(ckpts, tmp_path: pathlib.Path) -> None:
    """GPTQ group 16 is a valid GPTQ setting, but nanoserve's layout needs multiples of 32."""
    path = copy_of(ckpts["gptq"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 16
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        LLM(str(path), **SMALL)
    assert_names(err, "model.layers.0.", "group size 16", "32")


# -------------------------------------------------------------------------------- corrupt tensors

P = "model.layers.0."


SHAPE_CASES = [
    ("gptq", P + "self_attn.q_proj.qweight", lambda t: t[:-1]),  # one packed row (8 inputs) short
    ("gptq", P + "self_attn.k_proj.qzeros", lambda t: t[:-1]),  # one group short
    ("gptq", P + "self_attn.q_proj.scales", lambda t: t[:-1]),
    ("gptq", P + "self_attn.o_proj.qweight", lambda t: t[:-1]),
    ("gptq", P + "mlp.down_proj.scales", lambda t: t[:, :-1]),  # one output short
    ("gptq", P + "mlp.up_proj.qweight", lambda t: torch.cat([t, t])),  # twice the inputs
    ("awq", P + "self_attn.v_proj.qweight", lambda t: t[:-1]),
    ("awq", P + "self_attn.o_proj.scales", lambda t: t[:-1]),
    ("awq", P + "mlp.down_proj.qzeros", lambda t: t[:, :-1]),
    ("compressed-tensors", P + "self_attn.q_proj.weight_packed", lambda t: t[:-1]),
    ("compressed-tensors", P + "mlp.down_proj.weight_scale", lambda t: t[:, :-1]),
    ("compressed-tensors", P + "mlp.gate_proj.weight_zero_point", lambda t: t[:, :-1]),
    ("compressed-tensors", P + "self_attn.o_proj.weight_shape", lambda t: t + 1),
]


@pytest.mark.parametrize(
    "fmt, tensor, damage",
    SHAPE_CASES,
    ids=[f"{fmt}-{tensor.split('.', 3)[3]}" for fmt, tensor, _ in SHAPE_CASES],
)
def test_a_quantized_tensor_of_the_wrong_shape_is_named(
    ckpts, tmp_path: pathlib.Path, fmt: str, tensor: str, damage: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Never truncated, broadcast or unpacked into the wrong rows: the error names the tensor and its shape."""
    path = copy_of(ckpts[fmt], tmp_path)
    weights = load_file(path / "model.safetensors")
    weights[tensor] = damage(weights[tensor]).contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        LLM(str(path), **SMALL)
    assert_names(err, tensor)
    assert "shape" in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "fmt, tensor",
    [
        ("gptq", P + "self_attn.q_proj.scales"),
        ("gptq", P + "mlp.down_proj.qzeros"),
        ("gptq-act-order", P + "self_attn.k_proj.g_idx"),  # required once desc_act is set
        ("awq", P + "mlp.up_proj.scales"),
        ("compressed-tensors", P + "self_attn.v_proj.weight_scale"),
        ("compressed-tensors", P + "self_attn.o_proj.weight_shape"),
        ("compressed-tensors", P + "mlp.gate_proj.weight_zero_point"),  # required by an asymmetric scheme
    ],
)
def test_a_missing_quantized_tensor_is_named(ckpts, tmp_path: pathlib.Path, fmt: str, tensor: str) -> None:
    path = copy_of(ckpts[fmt], tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights[tensor]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as err:
        LLM(str(path), **SMALL)
    # named as in the checkpoint, or as the part of the fused parameter it feeds (qkv_proj.scales shard q)
    module, suffix = tensor.rsplit(".", 1)
    parent, leaf = module.rsplit(".", 1)
    if leaf in FUSED:
        ours, part = FUSED[leaf]
        fused = f"{parent}.{ours}.{suffix} shard {part}"
        assert tensor in str(err.value) or fused in str(err.value), str(err.value)
    else:
        assert_names(err, tensor)


# ------------------------------------------------------------------------------------ tensor parallel


def rank_context(path: pathlib.Path, tp_size: int, rank: int = 0, **options: Any) -> tuple[EngineConfig, BuildContext]:
    """The config and build context rank ``rank`` of a ``tp_size`` group gets (no process group: building and
    loading run no collectives). The config is made for one rank: EngineConfig.create refuses splits that cut
    groups before any rank starts (tested through LLM below); this reaches the layers' own check behind it."""
    config = EngineConfig.create(str(path), **options)
    ctx = BuildContext(
        dtype=torch.float32, tp=TPGroup(rank=rank, size=tp_size), attention_backend=default_attention_backend("cpu"),
        max_position=config.max_model_len, kernels=None, quantization=config.quantization,
    )  # fmt: skip
    return config, ctx


@pytest.mark.parametrize(
    "source, options",
    [("float", {"quantization": "int4", "quantization_group_size": 32}), ("gptq", {})],
    ids=["int4-on-load", "gptq"],
)
def test_a_tensor_parallel_size_that_splits_a_group(ckpts, source: str, options: dict) -> None:
    """down_proj's 96 inputs over 2 ranks are 48 per rank: not whole groups of 32."""
    config, ctx = rank_context(ckpts[source], 2, **options)
    with pytest.raises(ValueError) as err:
        build_shard(resolve_architecture(config.hf_config), config.hf_config, ctx)
    assert_names(
        err, "model.layers.0.mlp.down_proj", "group size 32", "48", "tensor_parallel_size 2", "sizes that work are 1"
    )
    # the control: the same scheme at TP 2 on a model whose row-parallel inputs split into whole groups
    config, ctx = rank_context(ckpts["float128"], 2, quantization="int4", quantization_group_size=32)
    build_shard(resolve_architecture(config.hf_config), config.hf_config, ctx)


def test_the_tensor_parallel_hint_lists_only_usable_sizes(ckpts) -> None:
    config, ctx = rank_context(ckpts["float"], 2, quantization="int4", quantization_group_size=32)
    with pytest.raises(ValueError) as err:
        build_shard(resolve_architecture(config.hf_config), config.hf_config, ctx)
    assert "sizes that work are 1)" in str(err.value), str(err.value)


def test_a_group_split_through_llm_names_the_layer_and_stops_the_workers(ckpts) -> None:
    """What a user sees: the error, with the same words, and no worker left behind (EngineConfig.create
    refuses the split before any worker starts)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError) as err:
        LLM(str(ckpts["float"]), quantization="int4", quantization_group_size=32, tensor_parallel_size=2, **SMALL)
    assert_names(err, "mlp.down_proj", "group size 32", "tensor_parallel_size 2", "sizes that work are 1")
    # (multiprocessing's resource tracker stays for the life of this process, as it does after any spawn)
    left = [
        p for p in psutil.Process().children(recursive=True)
        if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())
    ]  # fmt: skip
    gone, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, f"workers still running: {alive}"


@pytest.mark.parametrize("rank", [0, 1])
def test_act_order_gptq_cannot_split_a_row_parallel_layer(ckpts, rank: int) -> None:
    """desc_act assigns a layer's input columns to groups across the whole input: a rank's slice of o_proj or
    down_proj cuts groups. Column-parallel layers (q/k/v, gate/up) split rows and load."""
    path = ckpts["gptq-act-order"]
    config, ctx = rank_context(path, 1)
    load_weights(resolve_architecture(config.hf_config)(config.hf_config, ctx), path)  # the control: TP 1 loads
    config, ctx = rank_context(path, 2, rank=rank)
    model = resolve_architecture(config.hf_config)(config.hf_config, ctx)
    with pytest.raises(ValueError) as err:
        load_weights(model, path)
    assert_names(err, "act-order", "desc_act", "tensor_parallel_size 1")
    assert f"{P}mlp.down_proj" in str(err.value) or f"{P}self_attn.o_proj" in str(err.value), str(err.value)
