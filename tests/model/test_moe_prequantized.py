"""Pre-quantized mixture-of-experts checkpoints: each expert's projections stored as a format's tensors, one set
per expert (``mlp.experts.{e}.gate_proj.weight_packed`` / ``.weight_scale`` / ..., Mixtral's
``block_sparse_moe.experts.{e}.w1``), as llmcompressor, GPTQ and AWQ write Qwen3-MoE and Mixtral; the packer
(``tests/quant_packers.py``) writes them from the formats' definitions, with a ``dequantized/`` float twin.

* Whole models, greedy and token for token, with chunked prefill and prefix-cache hits (``test_quantized_parity``'s
  prompts and engine settings): compressed-tensors int4 group 32 symmetric at TP 1 against transformers on the
  *same* checkpoint (transformers 5 with compressed-tensors decompresses each expert's packed tensors into its
  fused experts at load) and on the twin; asymmetric at TP 2 against the twin only: transformers 5.24 with
  compressed-tensors 0.20.1 cannot load asymmetric experts (its expert conversion drops the zero points:
  "Asymmetric quant requires zero-point values"); GPTQ asymmetric at TP 1 against the twin.
* Loading, no engine: every expert's widened weights are the twin's (compressed-tensors symmetric and asymmetric,
  GPTQ, AWQ, W8A8; Qwen3-MoE and Mixtral names; a layer whose experts the ignore list keeps float); each TP rank
  holds its slice; the router and LM head stay float; ``plan``'s expert bytes are the packed buffers'; ``verify``
  on asymmetric experts.
* Bad input: a missing tensor of one expert, a whole expert missing, a packed tensor of the wrong shape, a TP
  size that splits a group, stacked pre-quantized experts, an ignore list naming some experts of a layer,
  quantization_skip (which applies to quantize-on-load only).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoserve import LLM
from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers.moe import FusedMoE
from nanoserve.models.decoder import BuildContext
from nanoserve.models.loader import load_weights
from nanoserve.models.registry import resolve_architecture
from nanoserve.quantization.config import module_skipped
from nanoserve.quantization.linear import finish_loading
from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS, build_checkpoint
from nanoserve.testing.reference import hf_greedy, load_hf_model
from tests.conftest import CheckpointCache
from tests.model.test_quantized_parity import ENGINE, GREEDY, MAX_TOKENS, PROMPTS, _assert_same
from tests.quant_packers import write_quantized_checkpoint

# name -> (format, bits, group size, symmetric): what the packer writes for each test checkpoint.
FORMATS = {
    "ct-sym": ("compressed-tensors", 4, 32, True),
    "ct-asym": ("compressed-tensors", 4, 32, False),
    "gptq-asym": ("gptq", 4, 32, False),
    "awq": ("awq", 4, 32, False),
    "w8a8": ("int-quantized", 8, -1, True),
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pathlib.Path]:
    """``quantized(fmt, arch="qwen3-moe", skip=())``: the packer's checkpoint of a float MoE model, cached.
    Qwen3-MoE (layer 1 dense) has experts 64 wide here: 32 per rank at TP 2, whole groups of 32."""
    root = tmp_path_factory.mktemp("moe-prequant")
    floats = {
        "qwen3-moe": lambda: build_checkpoint(root / "qwen3-moe", **{**DEFAULT_ARCH_CONFIGS["qwen3-moe"], "moe_intermediate_size": 64}),
        "mixtral": lambda: build_checkpoint(root / "mixtral", **DEFAULT_ARCH_CONFIGS["mixtral"]),
    }  # fmt: skip
    built: dict[Any, pathlib.Path] = {}

    def get(fmt: str, arch: str = "qwen3-moe", skip: tuple[str, ...] = ()) -> pathlib.Path:
        if arch not in built:
            built[arch] = floats[arch]()
        key = (fmt, arch, skip)
        if key not in built:
            dst = root / f"{fmt}-{arch}-{len(built)}"
            built[key], _ = write_quantized_checkpoint(built[arch], dst, *FORMATS[fmt], skip=("lm_head", *skip))
        return built[key]

    return get


def _experts(model: Any) -> dict[str, FusedMoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedMoE)}


def _build(path: pathlib.Path, rank: int = 0, tp: int = 1) -> Any:
    """Rank ``rank``'s model of ``path``, loaded in this process as the runner loads it (no workers)."""
    config = EngineConfig.create(str(path), tensor_parallel_size=tp)
    ctx = BuildContext(
        torch.float32, TPGroup(rank=rank, size=tp), "torch_sdpa", config.max_model_len, quantization=config.quantization
    )
    model = resolve_architecture(config.hf_config)(config.hf_config, ctx)
    load_weights(model, path)
    finish_loading(model)
    return model


def _copy(src: pathlib.Path, dst: pathlib.Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> pathlib.Path:
    """A copy of checkpoint ``src`` whose tensors ``edit`` changed in place (the dequantized twin left behind)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("dequantized"))
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------- whole models


def _generate(path: pathlib.Path, tp: int) -> list[list[int]]:
    """Greedy tokens of PROMPTS, the first alone so the others hit its cached prefix (checked)."""
    with LLM(str(path), **ENGINE, tensor_parallel_size=tp) as llm:
        first = llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
        rest = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[1:]], GREEDY, use_tqdm=False)
        assert sum(o.num_cached_tokens for o in rest) >= 8, "the shared prefix was not served from the prefix cache"
        if tp == 1:  # the experts really are packed (a float fallback would match the twin too)
            experts = _experts(llm.engine.executor.runner.model).values()
            assert experts and all(m.gate_up_proj.dtype == m.down_proj.dtype == torch.uint8 for m in experts)
        return [o.outputs[0].token_ids for o in first + rest]


@pytest.mark.parametrize("fmt, tp", [("ct-sym", 1), ("ct-asym", 2), ("gptq-asym", 1)])
def test_pre_quantized_experts_match_transformers(fmt: str, tp: int, quantized: Callable[..., pathlib.Path]) -> None:
    path = quantized(fmt)
    got = _generate(path, tp)
    _assert_same(got, [r.token_ids for r in hf_greedy(path / "dequantized", PROMPTS, MAX_TOKENS)])
    if fmt == "ct-sym":  # transformers on the same checkpoint: an unpacker independent of nanoserve's and the packer's
        model = load_hf_model(path)
        assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
        _assert_same(got, [r.token_ids for r in hf_greedy(None, PROMPTS, MAX_TOKENS, model=model)])


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize(
    "fmt, arch, skip",
    [
        ("ct-sym", "qwen3-moe", ()), ("ct-asym", "qwen3-moe", ()), ("gptq-asym", "qwen3-moe", ()),
        ("awq", "qwen3-moe", ()), ("w8a8", "qwen3-moe", ()), ("ct-sym", "mixtral", ()),
        ("ct-asym", "qwen3-moe", ("layers.0.mlp.experts",)),
    ],
    ids=["ct-sym", "ct-asym", "gptq-asym", "awq", "w8a8", "mixtral-ct-sym", "ct-asym-layer0-ignored"],
)  # fmt: skip
def test_each_expert_holds_exactly_the_dequantized_weights(
    fmt: str, arch: str, skip: tuple[str, ...], quantized: Callable[..., pathlib.Path]
) -> None:
    path = quantized(fmt, arch, skip)
    twin = load_file(path / "dequantized" / "model.safetensors")
    model = _build(path)
    gate, up, down = model.expert_projection_names
    experts = _experts(model)
    assert len(experts) == 2
    for name, m in experts.items():
        layer = name.rsplit(".mlp.experts", 1)[0] + f".{model.expert_block_name}.experts"
        float_layer = any(s in layer for s in skip)  # the ignore list keeps this layer's experts float
        assert (m.gate_up_quant is None, m.down_quant is None) == (float_layer, float_layer)
        assert m.gate_up_proj.dtype == (torch.float32 if float_layer else torch.uint8)
        gate_up, down_w = m.dequantized()
        for e in range(m.num_experts):
            want = torch.cat([twin[f"{layer}.{e}.{gate}.weight"], twin[f"{layer}.{e}.{up}.weight"]])
            # The layout computes s * c - s * z, the packer s * (c - z): equal up to one rounding.
            torch.testing.assert_close(gate_up[e], want, rtol=0, atol=1e-6)
            torch.testing.assert_close(down_w[e], twin[f"{layer}.{e}.{down}.weight"], rtol=0, atol=1e-6)
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert routers and all(r.quant is None and r.weight.dtype == torch.float32 for r in routers)
    assert model.lm_head.quant is None


def test_each_rank_holds_its_slice_of_the_experts(quantized: Callable[..., pathlib.Path]) -> None:
    path = quantized("ct-asym")
    whole = [m.dequantized() for m in _experts(_build(path)).values()]
    for rank in range(2):
        for (gate_up, down), ours in zip(whole, _experts(_build(path, rank, 2)).values()):
            i = down.shape[2] // 2
            own = slice(rank * i, (rank + 1) * i)
            got_gate_up, got_down = ours.dequantized()
            assert torch.equal(got_gate_up, torch.cat([gate_up[:, : 2 * i][:, own], gate_up[:, 2 * i :][:, own]], dim=1))
            assert torch.equal(got_down, down[:, :, own])


def test_plan_counts_the_packed_experts(quantized: Callable[..., pathlib.Path]) -> None:
    from tests.tools.plan_check import plan_beside_real_ranks

    _, _, ranks = plan_beside_real_ranks(str(quantized("ct-asym")), 2)
    for r, real in ranks:
        experts = _experts(real).values()
        packed = [m.num_experts * (m.gate_up_quant.shape.nbytes + m.down_quant.shape.nbytes) for m in experts]
        active = [m.top_k * (m.gate_up_quant.shape.nbytes + m.down_quant.shape.nbytes) for m in experts]
        assert r.expert_bytes == sum(packed) > 0
        assert r.active_weight_bytes == r.weight_bytes - sum(packed) + sum(active)


def test_verify_checks_asymmetric_experts_against_the_dequantized_model(quantized: Callable[..., pathlib.Path]) -> None:
    """transformers cannot load them (see the module docstring): `verify` says so and uses nanoserve's widening."""
    from nanoserve.tools.verify import run_verify

    report = run_verify(str(quantized("ct-asym")), prompts=["a b c d", "the quick brown fox"], max_tokens=6, progress=False, kv_cache_memory="2MiB")
    assert report.mode == "exact" and report.ok, report.format_text()
    assert "transformers cannot load asymmetric experts" in report.reference["kind"]
    assert report.totals()["matching_tokens"] == report.totals()["compared_tokens"] == 12


def test_re_patterns_of_an_ignore_list_match_from_the_start() -> None:
    """compressed-tensors' ``re:`` targets (llmcompressor ignores MoE routers as ``re:.*mlp.gate$``)."""
    assert module_skipped(("re:.*mlp.gate$",), ["model.layers.3.mlp.gate"])
    assert not module_skipped(("re:.*mlp.gate$",), ["model.layers.3.mlp.gate_up_proj", "model.layers.3.mlp.experts"])
    assert not module_skipped(("re:mlp.gate",), ["model.layers.3.mlp.gate"])  # re.match: anchored at the start


# ------------------------------------------------------------------------------------------------ bad input


def _drop(*names: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for name in names:
            del tensors[name]

    return edit


def _halve_packed(tensors: dict[str, torch.Tensor]) -> None:
    key = "model.layers.0.mlp.experts.3.gate_proj.weight_packed"
    tensors[key] = tensors[key][:, : tensors[key].shape[1] // 2].contiguous()


def _stack_packed(tensors: dict[str, torch.Tensor]) -> None:
    prefix = "model.layers.0.mlp.experts"
    keys = [f"{prefix}.{e}.down_proj.weight_packed" for e in range(8)]
    tensors[f"{prefix}.down_proj.weight_packed"] = torch.stack([tensors.pop(k) for k in keys])


E5_UP = "model.layers.2.mlp.experts.5.up_proj"
E6_DOWN = "model.layers.0.mlp.experts.6.down_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop(f"{E5_UP}.weight_scale"),
         rf"incomplete quantized tensors \({E5_UP} \(part expert 5 up_proj\): has weight_packed, weight_shape, "
         r"weight_zero_point\); need weight_packed, weight_scale, weight_shape, weight_zero_point$"),
        (_drop(*(f"{E6_DOWN}.{s}" for s in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"))),
         r"missing tensors: model\.layers\.0\.mlp\.experts\.down_proj shard expert 6 down_proj$"),
        (_halve_packed,
         r"model\.layers\.0\.mlp\.experts\.3\.gate_proj\.weight_packed: shape \(64, 4\), expected \(64, 8\)"),
        (_stack_packed, r"model\.layers\.0\.mlp\.experts\.down_proj\.weight_packed: stacked low-bit expert tensors "
                        r"are not a hub layout"),
    ],
    ids=["one-tensor-of-an-expert", "a-whole-expert", "packed-shape", "stacked-packed"],
)  # fmt: skip
def test_a_broken_expert_tensor_is_named(
    edit: Callable[[dict[str, torch.Tensor]], None], message: str, quantized: Callable[..., pathlib.Path],
    tmp_path: pathlib.Path,
) -> None:  # fmt: skip
    """Through the engine: the runner's finish_loading names an expert left without one of its tensors."""
    path = _copy(quantized("ct-asym"), tmp_path / "m", edit)
    with pytest.raises(ValueError, match=message):
        LLM(str(path), kv_cache_memory="1MiB")


def test_stacked_float_experts_in_a_pre_quantized_checkpoint_are_refused(
    checkpoint: CheckpointCache, tmp_path: pathlib.Path
) -> None:
    """transformers 5's in-memory layout (``save_original_format=False``) is no Linear per expert, so a packer
    leaves it float: nanoserve says where pre-quantized experts must be, rather than quantize them itself."""
    path, _ = write_quantized_checkpoint(checkpoint("qwen3-moe-step2-stacked"), tmp_path / "m", "compressed-tensors", 4, 32, True)
    with pytest.raises(ValueError, match=r"checkpoint tensor model\.layers\.1\.mlp\.experts\.(down|gate_up)_proj .*: stacked "
                       r"expert tensor \(experts\.(down|gate_up)_proj\) in a compressed-tensors checkpoint"):  # fmt: skip
        LLM(str(path), kv_cache_memory="1MiB")


def test_a_group_that_cuts_a_ranks_expert_slice_is_refused(checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    """Experts 32 wide, groups of 32: TP 2 gives each rank 16 of down's input columns, half a group."""
    path, _ = write_quantized_checkpoint(checkpoint("qwen3-moe"), tmp_path / "m", "compressed-tensors", 4, 32, True)
    with pytest.raises(ValueError, match=r"mlp\.experts\.down_proj: group size 32 does not fit this rank's share of its "
                       r"input \(32 over tensor_parallel_size 2\); the sizes that work are 1$"):  # fmt: skip
        EngineConfig.create(str(path), tensor_parallel_size=2)


def test_quantization_skip_does_not_reach_pre_quantized_experts(quantized: Callable[..., pathlib.Path]) -> None:
    """The checkpoint's own ignore list decides what is float (above); quantization_skip is quantize-on-load's."""
    with pytest.raises(ValueError, match=r"quantization_skip apply to quantize-on-load .*already quantized \(compressed-tensors\)"):
        EngineConfig.create(str(quantized("ct-sym")), quantization_skip="mlp.experts")


def test_an_ignore_list_naming_some_experts_of_a_layer_is_refused(quantized: Callable[..., pathlib.Path]) -> None:
    path = quantized("ct-sym", skip=("experts.3.",))
    assert "model.layers.0.mlp.experts.3.up_proj" in json.loads((path / "config.json").read_text())["quantization_config"]["ignore"]
    with pytest.raises(ValueError, match=r"ignore list keeps only some of the expert projections of model\.layers\.0\.mlp\.experts "
                       r"in float \(model\.layers\.0\.mlp\.experts\.3\.gate_proj, .*all of them low-bit or none"):  # fmt: skip
        _build(path)
