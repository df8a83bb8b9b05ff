"""Low-bit experts (quantize on load, int8 and int4) for Qwen3-MoE and Mixtral.

* Whole models against transformers running the weights exactly as nanoserve widens them
  (``quantization.export.write_dequantized_checkpoint``, per-expert tensors), greedy and token for token, with
  chunked prefill and prefix-cache hits (``test_quantized_parity.py``'s prompts and engine settings).
* The experts layer against a torch reference on its own dequantized weights: one token, many tokens (the
  slab-GEMM path), unchosen experts poisoned, int8 activations.
* Loading: per-expert and stacked checkpoints give identical packed buffers; each TP rank's buffers hold
  exactly its slice of TP 1's weights; the router stays float; skip patterns; ``plan``'s packed sizes.
* Bad input: a group size that cuts a rank's expert slice. (Pre-quantized experts: ``test_moe_prequantized.py``.)
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from nanoserve import LLM
from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers import native
from nanoserve.layers.moe import DOWN, GATE, UP, ExpertPart, FusedMoE, route
from nanoserve.models.decoder import BuildContext
from nanoserve.models.loader import load_weights
from nanoserve.models.registry import resolve_architecture
from nanoserve.quantization import layout
from nanoserve.quantization.config import QuantizationConfig, WeightScheme
from nanoserve.quantization.export import write_dequantized_checkpoint
from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS, build_checkpoint
from nanoserve.testing.reference import hf_greedy
from tests.conftest import CheckpointCache
from tests.model.test_quantized_parity import ENGINE, GREEDY, MAX_TOKENS, PROMPTS, _assert_same
from tests.unit.test_moe_layer import reference_moe

INT4 = dict(quantization="int4", quantization_group_size=32)
KERNELS = native.kernels_for(torch.float32, "cpu")


def _experts(llm_or_model: Any) -> list[FusedMoE]:
    model = getattr(llm_or_model, "engine", None)
    model = model.executor.runner.model if model is not None else llm_or_model
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def _build(path: pathlib.Path, rank: int = 0, tp: int = 1, load: bool = True, **options: Any) -> Any:
    """Rank ``rank``'s model of ``path`` with ``options``' quantization, in this process (no workers)."""
    config = EngineConfig.create(str(path), tensor_parallel_size=tp, **options)
    ctx = BuildContext(
        torch.float32, TPGroup(rank=rank, size=tp), "torch_sdpa", config.max_model_len, kernels=KERNELS,
        quantization=config.quantization,
    )  # fmt: skip
    model = resolve_architecture(config.hf_config)(config.hf_config, ctx)
    if load:
        load_weights(model, path)
    return model


# ------------------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("options", [dict(quantization="int8"), INT4], ids=["int8", "int4-g32"])
@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_low_bit_experts_match_transformers_on_the_widened_weights(
    name: str, options: dict[str, Any], checkpoint: CheckpointCache, tmp_path: pathlib.Path
) -> None:
    path = checkpoint(name)
    with LLM(str(path), **ENGINE, **options) as llm:
        experts = _experts(llm)
        assert experts and all(m.gate_up_proj.dtype == m.down_proj.dtype == torch.uint8 for m in experts)
        first = llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
        rest = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[1:]], GREEDY, use_tqdm=False)
        assert sum(o.num_cached_tokens for o in rest) >= 8, "the shared prefix was not served from the prefix cache"
        got = [o.outputs[0].token_ids for o in first + rest]
        quant = llm.config.quantization
    widened = write_dequantized_checkpoint(path, tmp_path / "widened", quant)
    # The oracle is blind unless the experts it runs are the widened ones, not the originals.
    key = "model.layers.0.mlp.experts.3.down_proj.weight" if name == "qwen3-moe" else "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    ours, original = load_file(widened / "model.safetensors")[key], load_file(path / "model.safetensors")[key]
    assert ours.shape == original.shape and not torch.equal(ours, original)
    _assert_same(got, [r.token_ids for r in hf_greedy(widened, PROMPTS, MAX_TOKENS)])


# ------------------------------------------------------------------------------------------ the layer

E, H, INTER = 8, 64, 64


def _quant(bits: int, group: int, activations: str = "fp32") -> QuantizationConfig:
    return QuantizationConfig(f"int{bits}", WeightScheme(bits, group, False), activations)


def _layer(config: QuantizationConfig, top_k: int = 2, stacked: bool = False, seed: int = 3) -> FusedMoE:
    g = torch.Generator().manual_seed(seed)
    gate, up, down = (torch.randn(E, *s, generator=g) * 0.3 for s in ((INTER, H), (INTER, H), (H, INTER)))
    layer = FusedMoE(E, top_k, H, INTER, True, torch.float32, TPGroup())
    layer.use_quantized("experts", config, KERNELS)
    if stacked:
        layer.weight_loader(layer.gate_up_proj, torch.cat([gate, up], dim=1), "gate_up")
        layer.weight_loader(layer.down_proj, down, "down")
    else:
        for e in range(E):
            layer.weight_loader(layer.gate_up_proj, gate[e], ExpertPart(e, GATE))
            layer.weight_loader(layer.gate_up_proj, up[e], ExpertPart(e, UP))
            layer.weight_loader(layer.down_proj, down[e], ExpertPart(e, DOWN))
    return layer


@pytest.mark.parametrize("tokens", [1, 40], ids=["one-token", "many-tokens"])
@pytest.mark.parametrize("bits, group", [(8, -1), (4, 32)], ids=["int8", "int4-g32"])
def test_the_quantized_experts_layer_matches_torch_on_its_dequantized_weights(bits: int, group: int, tokens: int) -> None:
    layer = _layer(_quant(bits, group))
    assert layer.gate_up_proj.shape == (E, layer.gate_up_quant.shape.nbytes)
    gate_up, down = layer.dequantized()
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g)
    logits = torch.randn(tokens, E, generator=g)
    logits[:, 5:] = -1e4  # experts 5..7 are never chosen: poison their codes and scales (NaN if read)
    layer.gate_up_proj.data[5:] = 255
    layer.down_proj.data[5:] = 255
    want = reference_moe(x, gate_up[:, :INTER], gate_up[:, INTER:], down, logits, 2, True)
    torch.testing.assert_close(layer(x, logits), want, rtol=1e-4, atol=1e-4)


def test_int8_activations_go_through_the_same_matmul() -> None:
    """Each chosen expert's two products equal the layout's reference arithmetic with per-token int8 inputs."""
    layer = _layer(_quant(4, 32, "int8"))
    g = torch.Generator().manual_seed(9)
    x, logits = torch.randn(6, H, generator=g), torch.randn(6, E, generator=g)
    weights, ids = route(logits, 2, True)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], ids[t].tolist()):
            gu = layout.reference_linear(x[t : t + 1], layer.gate_up_proj.data[e], layer.gate_up_quant.shape, int8_activations=True)
            h = torch.nn.functional.silu(gu[:, :INTER]) * gu[:, INTER:]
            want[t] += w * layout.reference_linear(h, layer.down_proj.data[e], layer.down_quant.shape, int8_activations=True)[0]
    torch.testing.assert_close(layer(x, logits), want, rtol=1e-4, atol=1e-4)


def test_the_layer_refuses_a_group_that_cuts_a_ranks_expert_slice() -> None:
    layer = FusedMoE(E, 2, H, 32, True, torch.float32, TPGroup(rank=0, size=2))
    with pytest.raises(ValueError, match=r"experts\.down_proj: group size 32 does not divide the input size 16 .*"
                       r"input size 32 over tensor_parallel_size 2 gives 16 per rank; .* the sizes that work are 1\)"):
        layer.use_quantized("experts", _quant(4, 32), KERNELS)


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_per_expert_and_stacked_checkpoints_load_identical_packed_buffers(
    name: str, checkpoint: CheckpointCache, tmp_path: pathlib.Path
) -> None:
    stacked = build_checkpoint(tmp_path / name, **{**DEFAULT_ARCH_CONFIGS[name], "expert_layout": "stacked"})
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(stacked / "model.safetensors"))
    a, b = (_experts(_build(p, **INT4)) for p in (checkpoint(name), stacked))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.gate_up_proj.dtype == torch.uint8
        assert torch.equal(x.gate_up_proj, y.gate_up_proj) and torch.equal(x.down_proj, y.down_proj)


@pytest.fixture(scope="module")
def wide_experts(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Qwen3-MoE with experts 64 wide: 32 per rank at TP 2, whole groups of 32."""
    kwargs = {**DEFAULT_ARCH_CONFIGS["qwen3-moe"], "moe_intermediate_size": 64}
    return build_checkpoint(tmp_path_factory.mktemp("wide") / "m", **kwargs)


def test_each_rank_quantizes_exactly_its_slice(wide_experts: pathlib.Path) -> None:
    """Rows of gate and up are quantized alone and down's groups lie inside a rank's columns, so rank r's
    widened experts are TP 1's, sliced; the router is float and whole on every rank."""
    whole = [m.dequantized() for m in _experts(_build(wide_experts, **INT4))]
    for rank in range(2):
        model = _build(wide_experts, rank=rank, tp=2, **INT4)
        for (gate_up, down), ours in zip(whole, _experts(model)):
            i = down.shape[2]
            half = slice(rank * i // 2, (rank + 1) * i // 2)
            got_gate_up, got_down = ours.dequantized()
            assert torch.equal(got_gate_up, torch.cat([gate_up[:, :i][:, half], gate_up[:, i:][:, half]], dim=1))
            assert torch.equal(got_down, down[:, :, half])
        routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
        assert routers and all(r.quant is None and r.weight.dtype == torch.float32 for r in routers)


def test_tp2_generates_tp1s_tokens(wide_experts: pathlib.Path) -> None:
    outs = []
    for tp in (1, 2):
        with LLM(str(wide_experts), **ENGINE, **INT4, tensor_parallel_size=tp) as llm:
            outs.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], GREEDY, use_tqdm=False)])
    assert len({t for tokens in outs[0] for t in tokens}) >= 8, outs[0]  # not blind: varied tokens
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "skip, gate_up, down",
    [("mlp.experts", False, False), ("*.down_proj", True, False), ("*.gate_proj,*.up_proj", False, True)],
)
def test_skip_patterns_reach_the_experts(skip: str, gate_up: bool, down: bool, checkpoint: CheckpointCache) -> None:
    for m in _experts(_build(checkpoint("qwen3-moe"), load=False, **INT4, quantization_skip=skip)):
        assert (m.gate_up_quant is not None, m.down_quant is not None) == (gate_up, down)
        assert (m.gate_up_proj.dtype == torch.uint8, m.down_proj.dtype == torch.uint8) == (gate_up, down)


def test_skip_naming_only_gate_or_up_is_refused(checkpoint: CheckpointCache) -> None:
    with pytest.raises(ValueError, match=r"quantization_skip names only some parts of the fused layer .*experts \(.*w1\)"):
        _build(checkpoint("mixtral"), load=False, **INT4, quantization_skip="*.w1")


def test_plan_counts_the_packed_expert_bytes(checkpoint: CheckpointCache) -> None:
    from nanoserve.tools.plan import measure_shard

    path = str(checkpoint("mixtral"))
    fp32 = measure_shard(EngineConfig.create(path), 0)
    int4 = measure_shard(EngineConfig.create(path, **INT4), 0)
    model = _build(checkpoint("mixtral"), load=False, **INT4)
    packed = sum(m.num_experts * (m.gate_up_quant.shape.nbytes + m.down_quant.shape.nbytes) for m in _experts(model))
    assert int4.expert_bytes == packed < fp32.expert_bytes / 4
    inactive = sum(packed_layer - m.active_parameter_bytes() for m in _experts(model)
                   for packed_layer in [m.num_experts * (m.gate_up_quant.shape.nbytes + m.down_quant.shape.nbytes)])  # fmt: skip
    assert int4.active_weight_bytes == int4.weight_bytes - inactive


# -------------------------------------------------------------------------------------------- bad input


def test_a_group_that_cuts_the_expert_slice_is_refused_before_workers_start(checkpoint: CheckpointCache) -> None:
    with pytest.raises(ValueError, match=r"mlp\.experts\.down_proj: group size 32 does not fit this rank's share of its "
                       r"input \(32 over tensor_parallel_size 2\); the sizes that work are 1$"):
        EngineConfig.create(str(checkpoint("qwen3-moe")), tensor_parallel_size=2, **INT4)
