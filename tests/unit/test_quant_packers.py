"""The quantized-checkpoint packers in ``tests/quant_packers.py`` write what the real formats hold.

compressed-tensors is checked against the library itself (its ``pack_to_int32``, its compressor, and
transformers loading the checkpoint); GPTQ and AWQ, whose libraries are not installed, against words
worked out by hand from AutoGPTQ's ``pack`` and AutoAWQ's ``WQLinear_GEMM.from_linear``, so a wrong nibble
order or a missing zero offset shows up as a different hex literal.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from nanoserve.testing.checkpoints import build_checkpoint
from tests.quant_packers import (
    AWQ_REVERSE_ORDER,
    dequantize,
    gptq_g_idx,
    pack_awq,
    pack_bits,
    pack_compressed_tensors,
    pack_gptq,
    quantize_rtn,
    random_codes,
    unpack_bits,
    write_quantized_checkpoint,
)

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
PROMPT = torch.tensor([[5, 17, 99, 200, 3, 41, 250, 7]])


def _u32(word: int) -> int:
    """The int32 a checkpoint holds for the unsigned 32-bit ``word``."""
    return word - (1 << 32) if word >= 1 << 31 else word


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("quant_src")
    return {
        # qwen3: no biases; qwen2: q/k/v biases, which GPTQ / AWQ / CT modules keep
        "qwen3": build_checkpoint(root / "qwen3", arch="qwen3", vocab_size=320, hidden_size=64, num_hidden_layers=2),
        "qwen2": build_checkpoint(root / "qwen2", arch="qwen2", vocab_size=320, hidden_size=64, num_hidden_layers=2),
    }


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": layer.get_submodule(name).weight.detach()
        for i, layer in enumerate(model.model.layers)
        for name in LINEARS
    }


# ------------------------------------------------------------------------------------- codes and RTN


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_codes_stay_in_range_and_round_to_nearest(symmetric: bool, group_size: int) -> None:
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = quantize_rtn(weight, 4, group_size, symmetric, scale_dtype=torch.float16)
    assert codes.dtype == zeros.dtype == torch.int64 and scales.dtype == torch.float32
    assert scales.shape == zeros.shape == (16, 64 // (64 if group_size == -1 else group_size))
    assert 0 <= codes.min() and codes.max() <= 15
    assert torch.equal(scales, scales.half().float()), "scales must already be what float16 stores"
    if symmetric:
        assert (zeros == 8).all()
    error = (dequantize(codes, scales, zeros, group_size) - weight).abs()
    per_column = scales.repeat_interleave(64 // scales.shape[1], dim=1)
    # a group max lands on 7.5 steps and clips to 7; fp16-rounding the scale moves it by up to 2^-11 * 7.5
    assert (error <= per_column * 0.51).all()


def test_random_codes_are_deterministic_and_exact_in_half_precision() -> None:
    a = random_codes(8, 64, 3, 16, False, seed=7)
    b = random_codes(8, 64, 3, 16, False, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    codes, scales, zeros = a
    assert codes.max() <= 7 and zeros.min() >= 1 and zeros.max() <= 7
    assert torch.equal(scales, scales.bfloat16().float()) and torch.equal(scales, scales.half().float())
    assert (random_codes(8, 64, 4, -1, True, seed=1)[2] == 8).all()


# ------------------------------------------------------------------------------------------ GPTQ v1


def test_gptq_words_by_hand() -> None:
    n, k, g = 8, 32, 16
    codes = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 16  # codes[n, k] = (n + k) % 16
    zeros = torch.arange(n)[:, None] + 1 + 4 * torch.arange(2)[None, :]  # zeros[n, g] = n + 1 + 4g
    scales = (torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 1) / 64
    t = pack_gptq(codes, scales, zeros, bits=4, group_size=g)

    assert t["qweight"].shape == (4, 8) and t["qweight"].dtype == torch.int32
    # qweight[r, n]: nibble i = codes[n, 8r + i], lowest nibble first
    assert t["qweight"][0, 0] == 0x76543210  # codes[0, 0..7] = 0..7
    assert t["qweight"][0, 1] == _u32(0x87654321)  # codes[1, 0..7] = 1..8
    assert t["qweight"][1, 0] == _u32(0xFEDCBA98)  # codes[0, 8..15] = 8..15
    assert t["qweight"][3, 7] == _u32(0x6543210F)  # codes[7, 24..31] = 15, 0, 1, ..., 6
    # qzeros[g, c]: nibble i = zeros[8c + i, g] - 1 (the v1 offset)
    assert t["qzeros"].shape == (2, 1) and t["qzeros"].dtype == torch.int32
    assert t["qzeros"][0, 0] == 0x76543210  # zeros[0..7, 0] - 1 = 0..7
    assert t["qzeros"][1, 0] == _u32(0xBA987654)  # zeros[0..7, 1] - 1 = 4..11
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"], scales.t().half())
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [0] * 16 + [1] * 16

    v2 = pack_gptq(codes, scales, zeros, bits=4, group_size=g, v1_zero_offset=False)
    assert v2["qzeros"][0, 0] == _u32(0x87654321)  # zeros stored as they are
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq(codes, scales, zeros - 1, bits=4, group_size=g)


def test_gptq_desc_act_g_idx_by_hand() -> None:
    perm = torch.arange(31, -1, -1)  # act-order quantized the last column first
    # group 0 = columns perm[0:16] = 31..16, group 1 = columns 15..0
    assert gptq_g_idx(32, 16, perm).tolist() == [1] * 16 + [0] * 16
    perm = torch.tensor([3, 0, 2, 1, 7, 5, 6, 4])
    assert gptq_g_idx(8, 2, perm).tolist() == [0, 1, 1, 0, 3, 2, 3, 2]  # g_idx[perm[j]] = j // 2

    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    codes, scales, zeros = quantize_rtn(weight, 4, 16, False, scale_dtype=torch.float16, min_zero=1, perm=perm)
    t = pack_gptq(codes, scales, zeros, 4, 16, desc_act=True, perm=perm)
    g_idx = t["g_idx"].long()
    assert torch.equal(g_idx, torch.argsort(perm) // 16)
    error = (dequantize(codes, scales, zeros, 16, g_idx=g_idx) - weight).abs()
    assert (error <= scales[:, g_idx] * 0.5 * (1 + 1e-5)).all()
    with pytest.raises(ValueError, match="perm"):
        pack_gptq(codes, scales, zeros, 4, 16, desc_act=True)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_unpacks_the_autogptq_way(bits: int) -> None:
    """AutoGPTQ's reference forward: ``(qweight >> range(0, 32, bits)) & mask``, zeros ``+ 1``."""
    codes, scales, zeros = random_codes(32, 64, bits, 32, False, seed=bits)
    t = pack_gptq(codes, scales, zeros, bits, 32)
    shifts = torch.arange(0, 32, bits)
    mask = (1 << bits) - 1
    w = (t["qweight"][:, None, :].long() >> shifts[None, :, None]) & mask  # [K*b/32, 32/b, N]
    z = (t["qzeros"][:, :, None].long() >> shifts[None, None, :]) & mask  # [K/G, N*b/32, 32/b]
    assert torch.equal(w.reshape(64, 32).t(), codes)
    assert torch.equal(z.reshape(2, 32).t() + 1, zeros)


def test_gptq_three_bit_words_by_hand() -> None:
    """AutoGPTQ's 3-bit pack: 32 values in 3 words, values 10 and 21 split across word boundaries."""
    values = torch.tensor([5] * 10 + [0b110] + [3] * 10 + [0b011] + [6] * 10)  # 32 values along K
    words = [w & 0xFFFFFFFF for w in pack_bits(values[:, None], 3, dim=0)[:, 0].tolist()]
    fives, threes, sixes = (sum(v << (3 * j) for j in range(10)) for v in (5, 3, 6))
    assert words[0] == fives | (0b10 << 30)  # low 2 bits of value 10 at bits 30-31
    assert words[1] == 0b1 | (threes << 1) | (0b1 << 31)  # bit 2 of value 10; values 11..20; low bit of value 21
    assert words[2] == 0b01 | (sixes << 2)  # bits 1-2 of value 21; values 22..31
    assert torch.equal(unpack_bits(pack_bits(values, 3), 3, 32), values)


# ------------------------------------------------------------------------------------------ AWQ GEMM


def test_awq_words_by_hand() -> None:
    n, k, g = 16, 32, 16
    codes = torch.arange(n)[:, None].expand(n, k)  # codes[n, k] = n
    zeros = (torch.arange(n)[:, None] + 3 * torch.arange(2)[None, :]) % 16  # zeros[n, g] = (n + 3g) % 16
    scales = torch.full((n, 2), 0.25)
    t = pack_awq(codes, scales, zeros, g)

    assert t["qweight"].shape == (32, 2) and t["qweight"].dtype == torch.int32
    # nibble i of word j holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]
    assert (t["qweight"][:, 0] == 0x75316420).all()
    assert (t["qweight"][:, 1] == _u32(0xFDB9ECA8)).all()
    assert t["qzeros"].shape == (2, 2) and t["qzeros"].dtype == torch.int32
    assert t["qzeros"][0, 0] == 0x75316420  # no offset: zeros[0..7, 0] = 0..7
    assert t["qzeros"][1, 0] == _u32(0xA8649753)  # zeros[0..7, 1] = 3..10, interleaved
    assert t["scales"].shape == (2, 16) and t["scales"].dtype == torch.float16
    assert set(t) == {"qweight", "qzeros", "scales"}


def test_awq_unpacks_the_autoawq_way() -> None:
    """AutoAWQ's ``dequantize_gemm``: column c of a block of 8 is at shift ``4 * AWQ_REVERSE_ORDER[c]``."""
    codes, scales, zeros = random_codes(24, 64, 4, 32, False, seed=5)
    t = pack_awq(codes, scales, zeros, 32)
    shifts = 4 * torch.tensor(AWQ_REVERSE_ORDER)
    w = (t["qweight"][:, :, None].long() >> shifts) & 0xF  # [K, N/8, 8]
    z = (t["qzeros"][:, :, None].long() >> shifts) & 0xF
    assert torch.equal(w.reshape(64, 24).t(), codes)
    assert torch.equal(z.reshape(2, 24).t(), zeros)


# ------------------------------------------------------------------------------ compressed-tensors


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_is_compressed_tensors_pack_to_int32(bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes, _, zeros = random_codes(40, 96, bits, 32, False, seed=bits)
    offset = 1 << (bits - 1)
    signed = (codes - offset).to(torch.int8)  # what the library quantizes to
    assert torch.equal(pack_bits(codes, bits, dim=1), pack_to_int32(signed, bits))
    assert torch.equal(
        pack_bits(zeros, bits, dim=0), pack_to_int32((zeros - offset).to(torch.int8), bits, packed_dim=0)
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_compressed_tensors_compressor_writes_the_same(bits: int, symmetric: bool, group_size: int) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    codes, scales, zeros = random_codes(32, 64, bits, group_size, symmetric, seed=11)
    ours = pack_compressed_tensors(codes, scales, zeros, bits, group_size, symmetric)
    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    scheme = QuantizationScheme(
        targets=["Linear"], weights={"num_bits": bits, "type": "int", "symmetric": symmetric, **strategy}
    )
    signed_zp = (zeros - (1 << (bits - 1))).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(
        {
            "weight": dequantize(codes, scales, zeros, group_size),
            "weight_scale": scales,
            "weight_zero_point": signed_zp,
        },
        scheme,
    )
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_transformers_loads_the_compressed_tensors_checkpoint(
    sources: dict[str, pathlib.Path], tmp_path: pathlib.Path, bits: int, symmetric: bool, group_size: int
) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    dst, deq = write_quantized_checkpoint(
        sources["qwen3"], tmp_path / "ct", "compressed-tensors", bits, group_size, symmetric
    )
    reference = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    # transformers' default path rebuilds the compressed modules on meta, where compressed-tensors does not
    # pack zero points, so an asymmetric checkpoint (zero points packed on disk) only loads with dequantize=True
    # (llm-compressor issues #1618, #1704). Both paths decompress with the library's own unpacker.
    loads = [{"quantization_config": CompressedTensorsConfig(dequantize=True)}] + ([{}] if symmetric else [])
    for extra in loads:
        model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, **extra).eval()
        with torch.no_grad():
            logits = model(PROMPT).logits  # the default path decompresses on this first forward
            expected = reference(PROMPT).logits
        ours, theirs = _weights(model), _weights(reference)
        for name, weight in ours.items():
            assert weight.dtype == torch.float32
            torch.testing.assert_close(weight, theirs[name], rtol=0, atol=1e-6 * 1e-3, msg=name)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_compressed_tensors_checkpoint_layout(sources: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    dst, deq = write_quantized_checkpoint(sources["qwen2"], tmp_path / "ct", "compressed-tensors", 4, 32, False)
    tensors = load_file(dst / "model.safetensors")
    prefix = "model.layers.0.self_attn.k_proj"  # [32, 64], with a bias
    assert (
        tensors[f"{prefix}.weight_packed"].shape == (32, 8) and tensors[f"{prefix}.weight_packed"].dtype == torch.int32
    )
    assert (
        tensors[f"{prefix}.weight_scale"].shape == (32, 2) and tensors[f"{prefix}.weight_scale"].dtype == torch.float32
    )
    assert (
        tensors[f"{prefix}.weight_zero_point"].shape == (4, 2)
        and tensors[f"{prefix}.weight_zero_point"].dtype == torch.int32
    )
    assert tensors[f"{prefix}.weight_shape"].tolist() == [32, 64]
    assert f"{prefix}.weight" not in tensors and f"{prefix}.bias" in tensors
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"] == {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
        "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": False, "type": "int",
    }  # fmt: skip
    assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())
    assert (dst / "tokenizer.json").is_file() and (deq / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------- GPTQ / AWQ checkpoints


def _unpack_gptq(t: dict[str, torch.Tensor], prefix: str, bits: int, n: int, k: int) -> torch.Tensor:
    codes = unpack_bits(t[f"{prefix}.qweight"], bits, k, dim=0).t()
    zeros = unpack_bits(t[f"{prefix}.qzeros"], bits, n, dim=1).t() + 1
    scales = t[f"{prefix}.scales"].float().t()
    return dequantize(codes, scales, zeros, -1, g_idx=t[f"{prefix}.g_idx"])


def _unpack_awq(t: dict[str, torch.Tensor], prefix: str, n: int, k: int) -> torch.Tensor:
    shifts = 4 * torch.tensor(AWQ_REVERSE_ORDER)
    codes = ((t[f"{prefix}.qweight"][:, :, None].long() >> shifts) & 0xF).reshape(k, n).t()
    zeros = ((t[f"{prefix}.qzeros"][:, :, None].long() >> shifts) & 0xF).reshape(-1, n).t()
    scales = t[f"{prefix}.scales"].float().t()
    return dequantize(codes, scales, zeros, k // scales.shape[1])


@pytest.mark.parametrize(
    "fmt,bits,group_size,symmetric,desc_act",
    [
        ("gptq", 4, 32, True, False),
        ("gptq", 8, -1, False, False),
        ("gptq", 4, 32, False, True),
        ("awq", 4, 32, False, False),
    ],
)
def test_gptq_and_awq_checkpoints_encode_the_dequantized_twin(
    sources: dict[str, pathlib.Path],
    tmp_path: pathlib.Path,
    fmt: str,
    bits: int,
    group_size: int,
    symmetric: bool,
    desc_act: bool,
) -> None:
    dst, deq = write_quantized_checkpoint(
        sources["qwen2"], tmp_path / fmt, fmt, bits, group_size, symmetric, desc_act=desc_act
    )
    tensors, oracle = load_file(dst / "model.safetensors"), load_file(deq / "model.safetensors")
    original = load_file(sources["qwen2"] / "model.safetensors")
    for layer in range(2):
        for linear in LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            n, k = original[f"{prefix}.weight"].shape
            assert f"{prefix}.weight" not in tensors
            if fmt == "gptq":
                assert tensors[f"{prefix}.qweight"].shape == (k * bits // 32, n)
                assert tensors[f"{prefix}.qzeros"].shape == (
                    k // (k if group_size == -1 else group_size),
                    n * bits // 32,
                )
                assert tensors[f"{prefix}.g_idx"].dtype == torch.int32
                weight = _unpack_gptq(tensors, prefix, bits, n, k)
            else:
                assert tensors[f"{prefix}.qweight"].shape == (k, n // 8)
                weight = _unpack_awq(tensors, prefix, n, k)
            assert tensors[f"{prefix}.scales"].dtype == torch.float16
            assert torch.equal(weight, oracle[f"{prefix}.weight"]), prefix
            # the twin is a faithful RTN of the source, not just self-consistent
            assert (weight - original[f"{prefix}.weight"]).abs().max() < 0.5 * original[f"{prefix}.weight"].abs().max()
    for name in (
        "model.layers.0.self_attn.q_proj.bias",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    ):
        assert torch.equal(tensors[name], original[name]) and torch.equal(oracle[name], original[name])
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
            "gptq",
            bits,
            group_size,
            symmetric,
            desc_act,
        )
        assert qc["checkpoint_format"] == "gptq"
        assert json.loads((dst / "quantize_config.json").read_text()) == qc
        if desc_act:
            assert not torch.equal(tensors["model.layers.0.mlp.up_proj.g_idx"], gptq_g_idx(64, group_size))
    else:
        assert qc == {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 32,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }


def test_skip_leaves_modules_dense_and_names_them(sources: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    skip = ("lm_head", "down_proj")
    ct, _ = write_quantized_checkpoint(sources["qwen3"], tmp_path / "ct", "compressed-tensors", 4, 32, True, skip=skip)
    gptq, _ = write_quantized_checkpoint(sources["qwen3"], tmp_path / "gptq", "gptq", 4, 32, True, skip=skip)
    assert "model.layers.1.mlp.down_proj.weight" in load_file(ct / "model.safetensors")
    assert "model.layers.1.mlp.down_proj.weight" in load_file(gptq / "model.safetensors")
    ignore = json.loads((ct / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    dynamic = json.loads((gptq / "config.json").read_text())["quantization_config"]["dynamic"]
    assert len(dynamic) == 2 and all(rule.startswith("-:") for rule in dynamic)


def test_skipped_and_sharded_compressed_tensors_checkpoints_load(tmp_path: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM

    src = build_checkpoint(tmp_path / "src", arch="qwen3", vocab_size=320, num_hidden_layers=2, num_shards=2)
    dst, deq = write_quantized_checkpoint(src, tmp_path / "ct", "compressed-tensors", 4, 32, True, skip=("down_proj",))
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.q_proj.weight_packed" in index and "model.layers.1.mlp.down_proj.weight" in index
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, reference(PROMPT).logits, rtol=1e-5, atol=1e-5)
