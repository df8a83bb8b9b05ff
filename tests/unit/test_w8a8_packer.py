"""The test packer's compressed-tensors ``int-quantized`` (W8A8) checkpoints are what the library writes and
what transformers reads: the W8A8 fixtures of tests/model/test_w8a8_parity.py stand on this."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from nanoserve.testing.checkpoints import build_checkpoint
from tests.quant_packers import (
    dequantize,
    int_quantized_quantization_config,
    pack_int_quantized,
    quantize_rtn,
    write_quantized_checkpoint,
)

PROMPT = torch.tensor([[5, 17, 99, 200, 3, 41, 250, 7]])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_checkpoint(tmp_path_factory.mktemp("w8a8src") / "m", arch="qwen3", vocab_size=320, seed=5)


@pytest.mark.parametrize("group_size", [-1, 32])
def test_scales_are_the_compressed_tensors_observers(group_size: int) -> None:
    """quantize_rtn's symmetric 8-bit scale is compressed-tensors' ``calculate_qparams`` of the row's (group's)
    min and max: max|w| / 127.5, and its codes are the library's ``quantize`` of w with that scale."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)) * 0.2
    codes, scales, zeros = quantize_rtn(w, 8, group_size, True)
    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, **strategy)
    g = w.view(48, -1, 64 if group_size == -1 else group_size)
    theirs, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    torch.testing.assert_close(scales, theirs, rtol=0, atol=0)
    assert torch.all(zp == 0)
    q = quantize(x=w, scale=theirs, zero_point=zp, args=args, dtype=torch.int8)
    assert torch.equal(q, (codes - 128).to(torch.int8))
    assert q.min() == -128  # the most negative value of each row/group maps to -128, which a loader must accept


@pytest.mark.parametrize("group_size", [-1, 32])
def test_int_quantized_compressor_writes_the_same(group_size: int) -> None:
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)) * 0.2
    codes, scales, zeros = quantize_rtn(w, 8, group_size, True, scale_dtype=torch.bfloat16)
    ours = pack_int_quantized(codes, scales, zeros, group_size, torch.bfloat16)
    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, **strategy),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
    )
    assert IntQuantizationCompressor.can_compress(torch.nn.Linear, scheme)  # the format the library picks
    theirs = IntQuantizationCompressor.compress(
        {
            "weight": dequantize(codes, scales, zeros, group_size),
            "weight_scale": scales.to(torch.bfloat16),
            "weight_zero_point": torch.zeros(scales.shape, dtype=torch.int8),
        },
        scheme,
    )
    assert set(ours) == set(theirs) == {"weight", "weight_scale"}  # the symmetric zero point is not saved
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("group_size", [-1, 32])
def test_the_config_is_what_compressed_tensors_serializes(group_size: int) -> None:
    """Key for key ``ModelCompressor.update_config``'s: the library's QuantizationConfig dump plus the keys that
    method adds (version, quant_method, sparsity_config, transform_config)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    scheme = QuantizationScheme(
        targets=["Linear"], format="int-quantized",
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=False, **strategy),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
    )  # fmt: skip
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=["lm_head"], format="int-quantized", quantization_status="compressed"
    )
    theirs = {
        "version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
        "transform_config": {}, **config.model_dump(exclude=["quant_method"]),
    }  # fmt: skip
    ours = int_quantized_quantization_config(group_size, ["lm_head"])
    assert json.loads(json.dumps(ours)) == json.loads(json.dumps(theirs))


@pytest.mark.parametrize("group_size", [-1, 32])
def test_transformers_loads_and_runs_the_int_quantized_checkpoint(
    source: pathlib.Path, tmp_path: pathlib.Path, group_size: int
) -> None:
    """transformers (through compressed-tensors) reads our int8 weights as the dequantized twin holds them, and
    runs the checkpoint; its input activations are fake-quantized, so only with input_activations removed
    from the config are its logits the twin's."""
    from transformers import AutoModelForCausalLM

    dst, deq = write_quantized_checkpoint(source, tmp_path / "w8a8", "int-quantized", 8, group_size, True)
    tensors = load_file(dst / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert tensors[f"{prefix}.weight"].dtype == torch.int8 and tensors[f"{prefix}.weight"].shape == (64, 128)
    assert tensors[f"{prefix}.weight_scale"].shape == (64, 1 if group_size == -1 else 4)
    assert f"{prefix}.weight_zero_point" not in tensors and tensors["lm_head.weight"].dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    weight_only = tmp_path / "weight_only"
    weight_only.mkdir()
    for f in dst.iterdir():
        if f.is_file() and f.name != "config.json":
            (weight_only / f.name).symlink_to(f)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    (weight_only / "config.json").write_text(json.dumps(config))
    unquantized_inputs = AutoModelForCausalLM.from_pretrained(weight_only, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(PROMPT).logits
        w8a8 = model(PROMPT).logits  # decompresses on this first forward
        w8a16 = unquantized_inputs(PROMPT).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.quantization_scheme.input_activations.strategy == "token"
    torch.testing.assert_close(q_proj.weight, reference.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(w8a16, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(w8a8).all() and not torch.allclose(w8a8, expected, atol=1e-3)
